"""The HTTP submission API's decisions: who a bearer token is, what it may send as, how a request
body becomes a message and its envelope, and the JSON the API answers with.

- Tokens (`parse_tokens`): the tokens file holds one client per line, ``NAME TOKEN
  SENDER-PATTERN[,SENDER-PATTERN...]`` (``#`` comments and blank lines ignored); a pattern is a
  mailbox pattern as the users file's ``senders`` (relay.core.addresses.address_matches: the
  local part exact or ``*``, the domain ``name``, ``*.name`` or ``*``: ``*@billing.example.com``,
  ``*@*.example.com``, ``*``).
  `authorize` compares in constant time. A client may send only from an envelope sender its
  patterns allow, as a submission user may (403 otherwise).
- Bodies: ``message/rfc822`` is taken as is (relay.core.compose.load_eml: line ends made CRLF,
  Bcc removed); the envelope comes from the ``X-Mailrelay-From`` / ``X-Mailrelay-To`` request
  headers, else from the message's Sender/From and To/Cc/Bcc. ``application/json``
  (`json_submission`) is composed with relay.core.compose.compose, the library of
  ``mailrelay send``. Each problem is a `FieldError` naming the field (the API's 400).
- Content rules: `decode_content` puts the message through relay.core.smtp_data's DataDecoder,
  the same rules as SMTP DATA (NUL and lines over 998 octets ``554 5.6.0``, size ``552 5.3.4``,
  bare CR/LF normalised), so the two doors cannot drift apart; relay.core.accept then builds
  the queue entry and the ``Received:`` field (``with HTTP``) as for SMTP.

What it must not do: store, answer, read files or sockets (relay.http_api does). Pure.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relay.core.addresses import address_matches
from relay.core.compose import Attachment, ComposeError, Submission, compose, load_eml
from relay.core.smtp_data import DataDecoder
from relay.core.status import Reply

_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")


class FieldError(ValueError):
    """A request the API answers 400: `field` names the part at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class ApiClient:
    """One line of the tokens file."""

    name: str
    token: str
    senders: tuple[str, ...]  # mailbox patterns (relay.core.addresses.address_matches)

    def may_send_as(self, sender: str) -> bool:
        return any(address_matches(sender, pattern) for pattern in self.senders)


def parse_tokens(text: str) -> tuple[ApiClient, ...]:
    """The clients of a tokens file; ValueError naming the line for a malformed one."""
    clients: list[ApiClient] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"line {number}: use 'NAME TOKEN SENDER-PATTERN[,SENDER-PATTERN...]'")
        name, token, patterns = parts
        if len(token) < 8:
            raise ValueError(f"line {number}: the token of {name!r} is shorter than 8 characters")
        if name in names:
            raise ValueError(f"line {number}: client {name!r} appears twice")
        senders = tuple(p.strip().lower() for p in patterns.split(",") if p.strip())
        if not senders:
            raise ValueError(f"line {number}: client {name!r} has no sender pattern")
        names.add(name)
        clients.append(ApiClient(name, token, senders))
    return tuple(clients)


def authorize(clients: Sequence[ApiClient], authorization: str | None) -> ApiClient | None:
    """The client whose token the ``Authorization: Bearer TOKEN`` header carries, if any."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    offered = value.strip().encode("utf-8", "surrogateescape")
    found = None
    for client in clients:  # compare with every token: the time does not tell which matched
        if hmac.compare_digest(client.token.encode("utf-8"), offered):
            found = client
    return found


# --------------------------------------------------------------------------- bodies


def _addresses(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise FieldError(field, "must be an address or a list of addresses")


def _string(data: Mapping[str, Any], field: str, *, required: bool = False, where: str = "") -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise FieldError(where + field, "is required")
        return None
    if not isinstance(value, str):
        raise FieldError(where + field, "must be a string")
    return value


def json_submission(data: Any, *, date: datetime | None = None, message_id: str | None = None) -> Submission:
    """A JSON request body composed into a message and its envelope (compose's rules)."""
    if not isinstance(data, dict):
        raise FieldError("(body)", "must be a JSON object")
    known = {"from", "to", "cc", "bcc", "subject", "text", "html", "headers", "attachments"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FieldError(unknown[0], f"unknown field (use {', '.join(sorted(known))})")
    sender = _string(data, "from", required=True)
    to = _addresses(data.get("to"), "to")
    cc = _addresses(data.get("cc"), "cc")
    bcc = _addresses(data.get("bcc"), "bcc")
    if not (to or cc or bcc):
        raise FieldError("to", "no recipients: give at least one of to, cc, bcc")
    headers_value = data.get("headers")
    headers_value = {} if headers_value is None else headers_value
    if not isinstance(headers_value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers_value.items()
    ):
        raise FieldError("headers", "must be an object of header names to string values")
    attachments: list[Attachment] = []
    raw_attachments = data.get("attachments")
    raw_attachments = [] if raw_attachments is None else raw_attachments
    if not isinstance(raw_attachments, list):
        raise FieldError("attachments", "must be a list")
    for index, item in enumerate(raw_attachments):
        where = f"attachments[{index}]"
        if not isinstance(item, dict):
            raise FieldError(where, "must be an object with filename, contentType, contentBase64")
        filename = _string(item, "filename", required=True, where=f"{where}.")
        content_type = _string(item, "contentType", where=f"{where}.")
        encoded = _string(item, "contentBase64", required=True, where=f"{where}.")
        assert filename is not None and encoded is not None
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FieldError(f"{where}.contentBase64", "is not valid base64") from exc
        attachments.append(Attachment(filename, payload, content_type))
    try:
        return compose(
            mail_from=sender or "",
            to=to,
            cc=cc,
            bcc=bcc,
            subject=_string(data, "subject") or "",
            text=_string(data, "text") or "",
            html=_string(data, "html"),
            attachments=attachments,
            headers=list(headers_value.items()),
            date=date,
            message_id=message_id,
        )
    except ComposeError as exc:
        raise FieldError(_field_of(str(exc)), str(exc).replace("--", "")) from exc


def _field_of(message: str) -> str:
    """Which JSON field a compose error is about (its text names the `mailrelay send` option)."""
    for option, field in (
        ("--from", "from"),
        ("--to", "to"),
        ("--cc", "cc"),
        ("--bcc", "bcc"),
        ("--subject", "subject"),
        ("header", "headers"),
        ("attachment", "attachments"),
        ("recipients", "to"),
        ("sender", "from"),
    ):
        if option in message:
            return field
    return "(body)"


def raw_submission(data: bytes, *, mail_from: str | None, recipients: str | None) -> Submission:
    """A ``message/rfc822`` body; the envelope from the X-Mailrelay-From / X-Mailrelay-To
    request headers (comma-separated recipients) when given, else from the message."""
    if not data.strip():
        raise FieldError("(body)", "the message is empty")
    targets = [r.strip() for r in (recipients or "").split(",") if r.strip()]
    try:
        return load_eml(data, mail_from=mail_from.strip() if mail_from else None, recipients=targets)
    except ComposeError as exc:
        text = str(exc)
        if "--from" in text or "From" in text:
            field = "X-Mailrelay-From" if mail_from else "From"
        else:
            field = "X-Mailrelay-To" if recipients else "To"
        raise FieldError(
            field, text.replace("--from", "X-Mailrelay-From").replace("--to", "X-Mailrelay-To")
        ) from exc


def decode_content(content: bytes, max_size: int) -> DataDecoder:
    """The message through the SMTP DATA decoder's rules (see the module doc): its `problem` is
    the refusal, else its `content()` is what SMTP would have stored."""
    decoder = DataDecoder(max_size)
    content = _ANY_NEWLINE.sub(b"\r\n", content)  # what the decoder would do to bare CR/LF
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    # Dot-stuff (RFC 5321 4.5.2) what the decoder will unstuff, then end the transfer.
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    decoder.feed(stuffed + b".\r\n")
    return decoder


# --------------------------------------------------------------------------- answers


def recipient_answer(address: str, reply: Reply | str) -> dict[str, Any]:
    """One entry of the 202's ``recipients``: accepted (2xx) or refused, with the SMTP reply."""
    text = str(reply)
    code = int(text[:3]) if text[:3].isdigit() else 0
    rest = text[4:] if len(text) > 3 else ""
    enhanced, _, detail = rest.partition(" ")
    if not (enhanced[:1].isdigit() and enhanced.count(".") == 2):
        enhanced, detail = "", rest
    return {
        "address": address,
        "status": "accepted" if 200 <= code < 300 else "refused",
        "code": code,
        "enhanced": enhanced,
        "text": detail,
    }


def error_body(status: int, field: str | None, message: str) -> dict[str, Any]:
    """The JSON of every error answer."""
    error: dict[str, Any] = {"status": status, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}
