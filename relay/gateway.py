"""Mail gateways: carry a queued message out of the SMTP world (``nextHop.gateway``).

`build_gateway(hop, config)` turns a `GatewayHop` into a `relay.model.Transport`; the scheduler
calls it for every route whose next hop (or failover) is a gateway, exactly as it calls SMTP
delivery. Three transports:

``webhook``  POST each message to an HTTP(S) URL, once per delivery request (all recipients of
    the request in one POST). Two body formats:

    ``json`` (``Content-Type: application/json``)::

        {"version": 1,
         "queueId": "18B3F2A9C1D04E7A3F",
         "envelope": {"from": "alice@example.com", "recipients": ["bob@example.net"]},
         "headers": [["From", "Alice <alice@example.com>"], ["Subject", "Grüße"], ...],
         "subject": "Grüße",            # decoded (RFC 2047), null when absent
         "text": "...",                 # first text/plain part, decoded; null when none
         "html": "...",                 # first text/html part, decoded; null when none
         "attachments": [{"filename": "a.png", "contentType": "image/png", "size": 1234}],
         "size": 4567,                  # bytes of the raw message
         "raw": "<base64 of the whole message exactly as queued (CRLF lines)>"}

      Header values are decoded to Unicode; the order and repetitions of the message are kept.
      ``text`` and ``html`` have LF line endings; ``raw`` is untouched.

    ``rfc822`` (``Content-Type: message/rfc822``): the raw message as the body, the envelope in
      ``X-Mailrelay-From``, ``X-Mailrelay-To`` (comma-separated) and ``X-Mailrelay-Queue-Id``
      (non-ASCII addresses percent-encoded as UTF-8, RFC 3986).

    An ``Authorization`` header is read from ``authHeaderFile`` (a mounted Secret) on every
    POST, so a rotated secret applies without a restart. TLS is verified against the system
    store or ``caFile`` unless ``insecureSkipVerify``. Answers: 2xx delivers; 5xx, 408, 429,
    3xx (redirects are not followed), timeouts and connection errors defer; other 4xx bounce
    with the HTTP status in the diagnostic (``5.0.0 webhook answered HTTP 404 Not Found``).

``maildir``  Final delivery into a Maildir (https://cr.yp.to/proto/maildir.html): one copy per
    recipient, written to ``tmp/``, fsynced, renamed into ``new/`` and the directory fsynced.
    Layout ``perRecipient`` uses ``{path}/{domain}/{local}/``; ``single`` uses ``{path}``
    itself. Lines are stored with LF endings (the Maildir convention) and each copy gets
    ``Return-Path`` (RFC 5321 4.4) and ``Delivered-To`` headers. Any OSError (full disk,
    read-only file system, permissions) defers: the queue keeps the message.

``pipe``  Run a command (no shell) with the message on stdin and the envelope in the environment
    (``MAILRELAY_SENDER``, ``MAILRELAY_RECIPIENTS`` comma-separated, ``MAILRELAY_QUEUE_ID``,
    ``MAILRELAY_RECIPIENT`` when run per recipient). Arguments may hold the placeholders
    ``{sender}``, ``{recipient}`` and ``{queue_id}``; with ``{recipient}`` the command runs once
    per recipient, otherwise once per request. Exit 0 delivers, 75 (EX_TEMPFAIL, sysexits.h)
    defers, any other status bounces with the command's stderr (truncated) in the diagnostic;
    a timeout kills the whole process group and defers. Only PATH, HOME, LANG, LC_ALL and TZ
    are passed from the relay's own environment.

Every transport returns exactly one `RecipientOutcome` per requested recipient, in request
order, and never raises for a delivery failure (DESIGN.md section 6). Blocking file work runs in
a thread. Metrics, retries and DSNs are the scheduler's business, not this module's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import signal
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from email import policy
from email.message import Message
from email.parser import BytesParser
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp

from relay.addresses import split_address
from relay.config import GatewayHop, MaildirGateway, PipeGateway, RelayConfig, WebhookGateway
from relay.model import (
    DeliveryRequest,
    Disposition,
    Recipient,
    RecipientOutcome,
    Transport,
)

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75  # sysexits.h: temporary failure, the caller should retry
DIAGNOSTIC_LIMIT = 400  # characters of stderr / HTTP body kept in a diagnostic


class GatewayConfigError(ValueError):
    """A gateway hop that cannot be built (the config validation should have caught it)."""


def build_gateway(hop: GatewayHop, config: RelayConfig) -> Transport:
    """The transport for one gateway hop; the caller owns it and must `close()` it."""
    if hop.webhook is not None:
        return WebhookTransport(hop.webhook)
    if hop.maildir is not None:
        return MaildirTransport(hop.maildir, hostname=config.hostname)
    if hop.pipe is not None:
        return PipeTransport(hop.pipe)
    raise GatewayConfigError("a gateway hop needs one of webhook, maildir, pipe")


# --------------------------------------------------------------------------- shared helpers


def _outcome(
    recipient: Recipient,
    disposition: Disposition,
    code: int,
    status: str,
    text: str,
    *,
    remote: str | None = None,
    relayed: bool = False,
) -> RecipientOutcome:
    return RecipientOutcome(
        recipient=recipient,
        disposition=disposition,
        code=code,
        status=status,
        text=text,
        remote_mta=remote,
        relayed=relayed,
    )


def _all(
    recipients: Sequence[Recipient],
    disposition: Disposition,
    code: int,
    status: str,
    text: str,
    *,
    remote: str | None = None,
    relayed: bool = False,
) -> list[RecipientOutcome]:
    return [_outcome(r, disposition, code, status, text, remote=remote, relayed=relayed) for r in recipients]


def one_line(text: str, limit: int = DIAGNOSTIC_LIMIT) -> str:
    """Collapse whitespace and control characters to single spaces and truncate with '...'."""
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


# --------------------------------------------------------------------------- webhook


def _decoded_text(part: Message) -> str | None:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # malformed transfer encoding: leave the text out, raw still has it
        return None
    if not isinstance(payload, bytes):
        return None
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload.decode(charset, errors="replace")
    except LookupError:  # unknown charset name
        text = payload.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n")


def webhook_json(queue_id: str, mail_from: str, recipients: Sequence[str], content: bytes) -> bytes:
    """The JSON document posted by the ``json`` format (see the module docstring)."""
    parsed = BytesParser(policy=policy.default).parsebytes(content)
    headers: list[list[str]] = []
    for name, value in parsed.items():
        try:
            headers.append([name, str(value)])
        except Exception:  # a header the parser cannot decode: send it undecoded
            headers.append([name, one_line(repr(value))])
    text: str | None = None
    html: str | None = None
    attachments: list[dict[str, Any]] = []
    for part in parsed.walk():
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        content_type = part.get_content_type()
        if disposition != "attachment" and content_type == "text/plain" and text is None:
            text = _decoded_text(part)
        elif disposition != "attachment" and content_type == "text/html" and html is None:
            html = _decoded_text(part)
        elif disposition == "attachment" or part.get_filename():
            payload = part.get_payload(decode=True)
            attachments.append(
                {
                    "filename": part.get_filename(),
                    "contentType": content_type,
                    "size": len(payload) if isinstance(payload, bytes) else 0,
                }
            )
    subject = parsed.get("Subject")
    document = {
        "version": 1,
        "queueId": queue_id,
        "envelope": {"from": mail_from, "recipients": list(recipients)},
        "headers": headers,
        "subject": str(subject) if subject is not None else None,
        "text": text,
        "html": html,
        "attachments": attachments,
        "size": len(content),
        "raw": base64.b64encode(content).decode("ascii"),
    }
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def _header_address(address: str) -> str:
    """An address safe for an HTTP header value: ASCII, non-ASCII percent-encoded (RFC 3986)."""
    return address if address.isascii() else urllib.parse.quote(address, safe="@!#$&'*+-/=?^_`{|}~.")


class WebhookTransport:
    """POSTs each delivery request to the configured URL with aiohttp."""

    def __init__(self, config: WebhookGateway) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._remote = urllib.parse.urlsplit(config.url).hostname or config.url

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.config.url.startswith("https:"):
            return True  # unused for http
        if self.config.insecure_skip_verify:
            return False
        if self.config.ca_file is not None:
            return ssl.create_default_context(cafile=str(self.config.ca_file))
        return True

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl())
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                headers={"User-Agent": "mailrelay-webhook/1"},
            )
        return self._session

    async def _auth_header(self) -> str | None:
        path = self.config.auth_header_file
        if path is None:
            return None
        text = await asyncio.to_thread(Path(path).read_text, "utf-8")
        value = text.strip()
        if not value or "\n" in value or "\r" in value:
            raise ValueError(f"{path} must hold one non-empty line (the Authorization header value)")
        return value

    async def deliver(self, request: DeliveryRequest) -> Sequence[RecipientOutcome]:
        recipients = request.recipients
        entry = request.message.entry
        addresses = [r.address for r in recipients]
        defer = Disposition.DEFERRED
        remote = self._remote
        try:
            auth = await self._auth_header()
        except (OSError, ValueError) as exc:
            return _all(recipients, defer, 451, "4.3.5", f"webhook auth header file unusable: {exc}")
        headers: dict[str, str] = {}
        if auth is not None:
            headers["Authorization"] = auth
        if self.config.format == "json":
            try:
                body = webhook_json(
                    entry.queue_id, entry.envelope.mail_from, addresses, request.message.content
                )
            except Exception as exc:  # the email parser is lenient; this is a broken invariant
                log.exception("cannot build webhook JSON for %s", entry.queue_id)
                return _all(recipients, defer, 451, "4.3.0", f"cannot build webhook JSON: {exc}")
            headers["Content-Type"] = "application/json; charset=utf-8"
        else:
            body = request.message.content
            headers["Content-Type"] = "message/rfc822"
            headers["X-Mailrelay-From"] = _header_address(entry.envelope.mail_from)
            headers["X-Mailrelay-To"] = ",".join(_header_address(a) for a in addresses)
            headers["X-Mailrelay-Queue-Id"] = entry.queue_id
        try:
            session = self._get_session()
            async with session.post(
                self.config.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                reason = response.reason or ""
                answer = await response.text(errors="replace")
        except TimeoutError:
            text = f"webhook timed out after {self.config.timeout:g}s"
            return _all(recipients, defer, 451, "4.4.2", text, remote=remote)
        except aiohttp.ClientConnectorCertificateError as exc:
            text = f"webhook TLS certificate not trusted: {one_line(str(exc.certificate_error))}"
            return _all(recipients, defer, 451, "4.7.5", text, remote=remote)
        except aiohttp.ClientConnectorError as exc:
            text = f"webhook connection failed: {one_line(str(exc.os_error) or str(exc))}"
            return _all(recipients, defer, 451, "4.4.1", text, remote=remote)
        except (aiohttp.ClientError, OSError) as exc:
            text = f"webhook request failed: {one_line(str(exc) or type(exc).__name__)}"
            return _all(recipients, defer, 451, "4.4.2", text, remote=remote)
        return self._classify(recipients, status, reason, answer)

    def _classify(
        self, recipients: Sequence[Recipient], status: int, reason: str, answer: str
    ) -> list[RecipientOutcome]:
        remote = self._remote
        if not reason:
            with contextlib.suppress(ValueError):
                reason = HTTPStatus(status).phrase
        said = f"webhook answered HTTP {status} {reason}".rstrip()
        detail = one_line(answer, 200)
        if detail:
            said = f"{said}: {detail}"
        if 200 <= status < 300:
            return _all(recipients, Disposition.DELIVERED, 250, "2.0.0", said, remote=remote, relayed=True)
        if status >= 500 or status in (408, 429) or 300 <= status < 400 or status < 200:
            return _all(recipients, Disposition.DEFERRED, 451, "4.3.0", said, remote=remote)
        return _all(recipients, Disposition.BOUNCED, 550, "5.0.0", said, remote=remote)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --------------------------------------------------------------------------- maildir

_counter_lock = threading.Lock()
_counter = 0


def _unique_name(hostname: str) -> str:
    """A Maildir file name in `mailbox.Maildir`'s form: ``time.MusecPpidQn.host``."""
    global _counter
    with _counter_lock:
        _counter += 1
        count = _counter
    now = time.time()
    host = hostname.replace("/", r"\057").replace(":", r"\072")
    return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{count}.{host}"


def folder_name(part: str) -> str:
    """A path component for a domain or local part: '/', '%', NUL and control characters are
    percent-encoded, and so is a leading '.' (no '.', '..' or hidden folders)."""
    out: list[str] = []
    for index, char in enumerate(part):
        if char in "/\\%" or not char.isprintable() or (index == 0 and char == "."):
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out) or "%00"


def maildir_for(config: MaildirGateway, address: str) -> Path:
    """Where a recipient's copy goes."""
    root = Path(config.path)
    if config.layout == "single":
        return root
    try:
        local, domain = split_address(address)
    except ValueError:
        local, domain = address, "localhost"
    return root / folder_name(domain) / folder_name(local)


def maildir_copy(content: bytes, mail_from: str, recipient: str) -> bytes:
    """The stored copy: Return-Path and Delivered-To prepended, LF line endings."""
    prefix = f"Return-Path: <{mail_from}>\r\nDelivered-To: {recipient}\r\n".encode()
    return (prefix + content).replace(b"\r\n", b"\n")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_maildir(folder: Path) -> None:
    if all((folder / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return
    created = not folder.exists()
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    _fsync_dir(folder)
    if created:
        _fsync_dir(folder.parent)


def write_maildir(folder: Path, data: bytes, hostname: str) -> Path:
    """Store one message atomically (tmp, fsync, rename into new, fsync new). Raises OSError."""
    _ensure_maildir(folder)
    name = _unique_name(hostname)
    tmp = folder / "tmp" / name
    final = folder / "new" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)
    return final


def _maildir_failure(recipient: Recipient, exc: OSError) -> RecipientOutcome:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _outcome(recipient, Disposition.DEFERRED, 452, "4.3.1", f"maildir full: {reason}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return _outcome(recipient, Disposition.DEFERRED, 451, "4.3.0", f"maildir not writable: {reason}")
    return _outcome(recipient, Disposition.DEFERRED, 451, "4.3.0", f"maildir write failed: {reason}")


class MaildirTransport:
    """Final delivery into Maildirs; one copy per recipient."""

    def __init__(self, config: MaildirGateway, *, hostname: str) -> None:
        self.config = config
        self.hostname = hostname

    def _deliver_one(self, request: DeliveryRequest, recipient: Recipient) -> RecipientOutcome:
        folder = maildir_for(self.config, recipient.address)
        data = maildir_copy(
            request.message.content, request.message.entry.envelope.mail_from, recipient.address
        )
        try:
            stored = self.write(folder, data)
        except OSError as exc:
            log.warning(
                "[%s] maildir delivery to %s deferred: %s", request.message.entry.queue_id, folder, exc
            )
            return _maildir_failure(recipient, exc)
        return _outcome(recipient, Disposition.DELIVERED, 250, "2.0.0", f"delivered to maildir {stored}")

    def write(self, folder: Path, data: bytes) -> Path:
        """The one place that touches the disk (tests may wrap it to inject an OSError)."""
        return write_maildir(folder, data, self.hostname)

    def _deliver_all(self, request: DeliveryRequest) -> list[RecipientOutcome]:
        return [self._deliver_one(request, r) for r in request.recipients]

    async def deliver(self, request: DeliveryRequest) -> Sequence[RecipientOutcome]:
        return await asyncio.to_thread(self._deliver_all, request)

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------- pipe

_PASSED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
# sysexits.h codes that name the recipient or host, for a better enhanced status (RFC 3463).
_EXIT_STATUS = {67: "5.1.1", 68: "5.1.2"}


def pipe_arguments(command: Sequence[str], sender: str, recipient: str, queue_id: str) -> list[str]:
    """Substitute the placeholders; nothing else in an argument is interpreted (no shell)."""
    return [
        arg.replace("{sender}", sender).replace("{recipient}", recipient).replace("{queue_id}", queue_id)
        for arg in command
    ]


class PipeTransport:
    """Runs the configured command for each request (or each recipient with ``{recipient}``)."""

    def __init__(self, config: PipeGateway) -> None:
        self.config = config
        self.per_recipient = any("{recipient}" in arg for arg in config.command)

    async def deliver(self, request: DeliveryRequest) -> Sequence[RecipientOutcome]:
        if self.per_recipient:
            outcomes: list[RecipientOutcome] = []
            for recipient in request.recipients:
                outcomes.extend(await self._run(request, (recipient,)))
            return outcomes
        return await self._run(request, request.recipients)

    def _environment(self, request: DeliveryRequest, recipients: Sequence[Recipient]) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASSED_ENVIRONMENT if k in os.environ}
        env.setdefault("PATH", os.defpath)
        entry = request.message.entry
        env["MAILRELAY_SENDER"] = entry.envelope.mail_from
        env["MAILRELAY_RECIPIENTS"] = ",".join(r.address for r in recipients)
        env["MAILRELAY_QUEUE_ID"] = entry.queue_id
        env["MAILRELAY_SIZE"] = str(len(request.message.content))
        if self.per_recipient:
            env["MAILRELAY_RECIPIENT"] = recipients[0].address
        return env

    async def _run(self, request: DeliveryRequest, recipients: Sequence[Recipient]) -> list[RecipientOutcome]:
        entry = request.message.entry
        args = pipe_arguments(
            self.config.command,
            entry.envelope.mail_from,
            recipients[0].address if self.per_recipient else "",
            entry.queue_id,
        )
        defer = Disposition.DEFERRED
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self._environment(request, recipients),
                start_new_session=True,  # its own process group, killed as a whole on timeout
            )
        except OSError as exc:
            text = f"cannot run pipe command {args[0]!r}: {exc.strerror or exc}"
            return _all(recipients, defer, 451, "4.3.5", text)
        try:
            _, stderr = await asyncio.wait_for(
                process.communicate(request.message.content), timeout=self.config.timeout
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            text = f"pipe command timed out after {self.config.timeout:g}s and was killed"
            return _all(recipients, defer, 451, "4.4.7", text)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
        code = process.returncode
        said = one_line(stderr.decode("utf-8", errors="replace"))
        if code == 0:
            return _all(
                recipients, Disposition.DELIVERED, 250, "2.0.0", "pipe command exited 0", relayed=True
            )
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            text = f"pipe command killed by signal {name}"
            return _all(recipients, defer, 451, "4.3.0", f"{text}: {said}" if said else text)
        if code == EX_TEMPFAIL:
            text = "pipe command exited 75 (temporary failure)"
            return _all(recipients, defer, 451, "4.3.0", f"{text}: {said}" if said else text)
        text = f"pipe command exited {code}"
        status = _EXIT_STATUS.get(code or 0, "5.3.0")
        return _all(recipients, Disposition.BOUNCED, 554, status, f"{text}: {said}" if said else text)

    async def close(self) -> None:
        return None


__all__ = [
    "GatewayConfigError",
    "MaildirTransport",
    "PipeTransport",
    "WebhookTransport",
    "build_gateway",
    "maildir_copy",
    "maildir_for",
    "webhook_json",
]
