"""Composing mail for the user agent: a message and its envelope, ready for SMTP submission.

`compose()` builds an RFC 5322 message with the standard library `email` package (RFC 2045-2049
MIME): a text body, an optional HTML alternative (``multipart/alternative``), attachments of any
type (``multipart/mixed``; MIME type guessed from the file name, then from the content; non-ASCII
file names as RFC 2231 parameters), extra headers, ``Date`` and ``Message-ID``. `load_eml()` takes
an existing message as is. Both return a `Submission`: the envelope (RFC 5321 3.3) and the exact
bytes that go after DATA (CRLF line endings, RFC 5321 2.3.8), so what a server receives can be
compared byte for byte with what was composed.

Bcc recipients are envelope-only: they never appear in any header (RFC 5322 3.6.3 allows this
form, and it is the only one that does not leak them to each other). A loaded .eml loses its Bcc
fields for the same reason; nothing else in it changes except line endings made CRLF.

Non-ASCII addresses need SMTPUTF8 (RFC 6531): the `Submission` says so and its headers are then
UTF-8 (RFC 6532); otherwise every header is 7-bit (RFC 2047 encoded words) and bodies are
quoted-printable or base64, so no 8BITMIME is needed.

Pure: no sockets, no file reads (callers pass attachment bytes), no clock unless the caller omits
``date`` (then now) and no randomness unless the caller omits ``message_id``: MIME boundaries
are derived from a hash of the content, so the same input composes to the same bytes. Called by
`relay.cli.send` and by any program or test that needs a message; it never sends anything.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, getaddresses, make_msgid, parseaddr
from typing import TypedDict, Unpack

from relay.core.addresses import split_address
from relay.core.headers import header_end

__all__ = [
    "Attachment",
    "ComposeError",
    "MessageFields",
    "Submission",
    "compose",
    "compose_message",
    "guess_content_type",
    "load_eml",
    "parse_header_option",
]


class ComposeError(ValueError):
    """The input cannot make a valid message; the text says what to change."""


@dataclass(frozen=True)
class Attachment:
    """One attached file: its name as the recipient should see it and its bytes."""

    filename: str
    data: bytes
    content_type: str | None = None  # "type/subtype"; guessed when None


@dataclass(frozen=True)
class Submission:
    """What a user agent hands to a submission server."""

    mail_from: str  # envelope reverse path (addr-spec)
    recipients: tuple[str, ...]  # envelope forward paths, To + Cc + Bcc, without duplicates
    content: bytes  # exactly the bytes sent after DATA (CRLF lines, ends with CRLF)
    smtputf8: bool = False  # an address is non-ASCII: the server must offer SMTPUTF8
    eight_bit: bool = False  # content has 8-bit bytes: needs 8BITMIME (or SMTPUTF8)


# --------------------------------------------------------------------------- addresses

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _addr_spec(text: str, what: str) -> str:
    """The addr-spec of one mailbox (``Name <a@b>`` or ``a@b``), checked."""
    if _CONTROL.search(text):
        raise ComposeError(f"{what} {text!r} contains a control character")
    _, address = parseaddr(text)
    if not address or " " in address or "<" in address or ">" in address:
        raise ComposeError(f"{what} {text!r} is not a mail address; use name@example.com")
    try:
        split_address(address)
    except ValueError as exc:
        raise ComposeError(f"{what} {text!r} is not a mail address; use name@example.com") from exc
    return address


def _mailboxes(values: Iterable[str], what: str) -> list[tuple[str, str]]:
    """(header form, addr-spec) for each mailbox; one value may hold a comma-separated list."""
    found: list[tuple[str, str]] = []
    for value in values:
        if _CONTROL.search(value):
            raise ComposeError(f"{what} {value!r} contains a control character")
        pairs = getaddresses([value])
        if not pairs or any(not address for _, address in pairs):
            raise ComposeError(f"{what} {value!r} is not a mail address; use name@example.com")
        for name, address in pairs:
            spec = _addr_spec(address, what)
            found.append((f"{name} <{spec}>" if name else spec, spec))
    return found


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    result = []
    for address in addresses:
        key = address.lower()
        if key not in seen:
            seen.add(key)
            result.append(address)
    return tuple(result)


def _needs_smtputf8(addresses: Iterable[str]) -> bool:
    return any(not address.isascii() for address in addresses)


# --------------------------------------------------------------------------- MIME types

_EXTRA_TYPES = {
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
    ".wav": "audio/wav",
    ".ogv": "video/ogg",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".mov": "video/quicktime",
    ".webp": "image/webp",
    ".heic": "image/heic",
    ".avif": "image/avif",
    ".md": "text/markdown",
}
_ENCODED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}
# Leading bytes of common formats, for files whose name says nothing.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"%PDF-", 0, "application/pdf"),
    (b"ID3", 0, "audio/mpeg"),
    (b"OggS", 0, "audio/ogg"),
    (b"fLaC", 0, "audio/flac"),
    (b"ftyp", 4, "video/mp4"),
    (b"\x1a\x45\xdf\xa3", 0, "video/webm"),
    (b"PK\x03\x04", 0, "application/zip"),
    (b"\x1f\x8b", 0, "application/gzip"),
)


def guess_content_type(filename: str, data: bytes = b"") -> str:
    """``type/subtype`` from the file name (the system MIME table, then a few common media
    types it may lack), else from the content's leading bytes, else application/octet-stream."""
    guessed, encoding = mimetypes.guess_type(filename, strict=False)
    if encoding is not None:
        return _ENCODED_TYPES.get(encoding, "application/octet-stream")
    if guessed:
        return guessed
    suffix = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if suffix in _EXTRA_TYPES:
        return _EXTRA_TYPES[suffix]
    for magic, offset, content_type in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return content_type
    if data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):  # MPEG audio frame sync
        return "audio/mpeg"
    return "application/octet-stream"


# --------------------------------------------------------------------------- headers

_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 2.2 ftext
# Headers the options own: setting them through --header would contradict an option.
_OWNED = {
    "from": "--from",
    "to": "--to",
    "cc": "--cc",
    "bcc": "--bcc (envelope only, never a header)",
    "subject": "--subject",
    "mime-version": "(set automatically)",
    "content-type": "--body/--html-file/--attach",
    "content-transfer-encoding": "(set automatically)",
    "content-disposition": "--attach",
}


def parse_header_option(text: str) -> tuple[str, str]:
    """``"Name: value"`` → (name, value), checked for a valid field name and no line breaks."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise ComposeError(f"header {text!r} must look like 'Name: value'")
    if not _FIELD_NAME.match(name):
        raise ComposeError(f"header name {name!r} may only contain printable ASCII other than ':'")
    if _CONTROL.search(value.replace("\t", " ")):
        raise ComposeError(f"header {name!r} value must be one line without control characters")
    return name, value


def _check_extra_header(name: str, value: str) -> tuple[str, str]:
    name, value = parse_header_option(f"{name}: {value}")
    owner = _OWNED.get(name.lower())
    if owner is not None:
        raise ComposeError(f"do not set {name} with --header; use {owner}")
    return name, value


# --------------------------------------------------------------------------- bodies

_LONG_LINE = 998  # RFC 5322 2.1.1


def _text_cte(text: str) -> str:
    if text.isascii() and all(len(line) <= _LONG_LINE for line in text.splitlines()):
        return "7bit"
    return "quoted-printable"


def _domain_for_id(address: str) -> str:
    domain = split_address(address)[1]
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


class MessageFields(TypedDict, total=False):
    """What a composed message says besides its From (each optional; the defaults: no To or
    Cc, no Subject, an empty text body, no HTML, no attachments or extra headers, the Date of
    now and a generated Message-ID)."""

    to: Sequence[str]
    cc: Sequence[str]
    subject: str
    text: str
    html: str | None
    attachments: Sequence[Attachment]
    headers: Sequence[tuple[str, str]]
    date: datetime | None
    message_id: str | None


def compose_message(*, mail_from: str, **fields: Unpack[MessageFields]) -> EmailMessage:
    """The message alone (no Bcc: that lives only in the envelope, see `compose`)."""
    to, cc, subject = fields.get("to", ()), fields.get("cc", ()), fields.get("subject", "")
    text, html, attachments = fields.get("text", ""), fields.get("html"), fields.get("attachments", ())
    headers, date, message_id = fields.get("headers", ()), fields.get("date"), fields.get("message_id")
    senders = _mailboxes([mail_from], "--from")
    if len(senders) != 1:
        raise ComposeError(f"--from {mail_from!r} must be exactly one address")
    [(from_header, from_spec)] = senders
    to_boxes = _mailboxes(to, "--to")
    cc_boxes = _mailboxes(cc, "--cc")
    extra = [_check_extra_header(name, value) for name, value in headers]
    if _CONTROL.search(subject):
        raise ComposeError("--subject must be one line without control characters")

    message = EmailMessage(policy=policy.default)
    message["From"] = from_header
    if to_boxes:
        message["To"] = ", ".join(form for form, _ in to_boxes)
    if cc_boxes:
        message["Cc"] = ", ".join(form for form, _ in cc_boxes)
    if subject:
        message["Subject"] = subject
    overridden = {name.lower() for name, _ in extra}
    if "date" not in overridden:
        message["Date"] = format_datetime(date or datetime.now().astimezone())
    if "message-id" not in overridden:
        message["Message-ID"] = message_id or make_msgid(domain=_domain_for_id(from_spec))
    for name, value in extra:
        message[name] = value

    message.set_content(text, subtype="plain", charset="utf-8", cte=_text_cte(text))
    if html is not None:
        message.add_alternative(html, subtype="html", charset="utf-8", cte=_text_cte(html))
    for attachment in attachments:
        if not attachment.filename or "/" in attachment.filename or _CONTROL.search(attachment.filename):
            raise ComposeError(f"attachment name {attachment.filename!r} must be a plain file name")
        content_type = attachment.content_type or guess_content_type(attachment.filename, attachment.data)
        maintype, _, subtype = content_type.partition("/")
        if not subtype or maintype == "multipart":
            raise ComposeError(f"attachment type {content_type!r} must be a single-part type/subtype")
        if maintype == "message":  # the email package wants a parsed message there; keep bytes
            maintype, subtype = "application", "octet-stream"
        message.add_attachment(
            attachment.data, maintype=maintype, subtype=subtype, filename=attachment.filename
        )
    digest = hashlib.sha256()
    for piece in (str(message["Message-ID"]), str(message["Date"]), text, html or ""):
        digest.update(piece.encode("utf-8", "surrogatepass") + b"\0")
    for attachment in attachments:
        digest.update(attachment.filename.encode("utf-8", "surrogatepass") + b"\0" + attachment.data)
    multipart_index = 0
    for part in message.walk():
        if part is not message:  # the email package repeats it in parts it creates
            del part["MIME-Version"]
        if part.is_multipart():
            # Derived from the content (which therefore cannot contain it), not random, so
            # the same input gives the same bytes (RFC 2046 5.1.1).
            part.set_boundary(f"=_mailrelay_{digest.hexdigest()[:32]}_{multipart_index}")
            multipart_index += 1
    return message


def compose(
    *,
    mail_from: str,
    bcc: Sequence[str] = (),
    envelope_from: str | None = None,
    **fields: Unpack[MessageFields],
) -> Submission:
    """A composed message with its envelope: To, Cc and Bcc are the recipients."""
    if not mail_from:
        raise ComposeError("a sender is needed: --from you@example.com")
    message = compose_message(mail_from=mail_from, **fields)
    to, cc = fields.get("to", ()), fields.get("cc", ())
    sender = _addr_spec(envelope_from or mail_from, "--from")
    recipients = _unique(
        spec
        for values, what in ((to, "--to"), (cc, "--cc"), (bcc, "--bcc"))
        for _, spec in _mailboxes(values, what)
    )
    if not recipients:
        raise ComposeError("no recipients: give at least one --to, --cc or --bcc")
    smtputf8 = _needs_smtputf8((sender, *recipients)) or _needs_smtputf8(
        spec for _, spec in _mailboxes([mail_from, *to, *cc], "address")
    )
    content = message.as_bytes(policy=policy.SMTPUTF8 if smtputf8 else policy.SMTP)
    return Submission(
        mail_from=sender,
        recipients=recipients,
        content=content,
        smtputf8=smtputf8,
        eight_bit=not content.isascii(),
    )


# --------------------------------------------------------------------------- existing messages

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")


def _crlf(data: bytes) -> bytes:
    data = _LINE_ENDINGS.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _without_bcc(data: bytes) -> bytes:
    """Drop Bcc fields (with their folded continuation lines) from the header section."""
    end = header_end(data)
    head, body = data[:end], data[end:]
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == b"bcc" and b":" in line
        if not dropping:
            kept.append(line)
    return b"".join(line + b"\r\n" for line in kept) + body


def load_eml(data: bytes, *, mail_from: str | None = None, recipients: Sequence[str] = ()) -> Submission:
    """An existing message, sent as is. The envelope comes from the arguments when given, else
    from the headers: sender from Sender or From, recipients from To, Cc and Bcc."""
    content = _without_bcc(_crlf(data))
    headers = BytesHeaderParser(policy=policy.default).parsebytes(_crlf(data))
    if mail_from is None:
        candidates = [str(v) for v in headers.get_all("Sender", []) or headers.get_all("From", [])]
        found = [spec for value in candidates for _, spec in getaddresses([value]) if spec]
        if not found:
            raise ComposeError("the message has no From header: give --from you@example.com")
        sender = _addr_spec(found[0], "From")
    else:
        sender = _addr_spec(mail_from, "--from")
    if recipients:
        targets = _unique(spec for _, spec in _mailboxes(recipients, "--to"))
    else:
        values = [str(v) for name in ("To", "Cc", "Bcc") for v in headers.get_all(name, [])]
        targets = _unique(spec for _, spec in getaddresses(values) if spec)
        for target in targets:
            _addr_spec(target, "recipient")
    if not targets:
        raise ComposeError("the message names no recipients (To, Cc, Bcc): give --to")
    return Submission(
        mail_from=sender,
        recipients=targets,
        content=content,
        smtputf8=_needs_smtputf8((sender, *targets)),
        eight_bit=not content.isascii(),
    )
