"""The webhook gateway: POST each message to an HTTP(S) URL (see relay.gateways).

The only module of the relay that speaks HTTP as a client (aiohttp stays inside relay.gateways).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import urllib.parse
from collections.abc import Sequence
from email import policy
from email.message import Message
from email.parser import BytesParser
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp

from relay.config import WebhookGateway
from relay.core.model import DeliveryRequest, Recipient, RecipientOutcome
from relay.core.outcome import bounced, deferred, delivered, for_all
from relay.gateways.common import one_line

log = logging.getLogger(__name__)


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
        remote = self._remote
        try:
            auth = await self._auth_header()
        except (OSError, ValueError) as exc:
            return for_all(recipients, deferred, "4.3.5", f"webhook auth header file unusable: {exc}")
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
                return for_all(recipients, deferred, "4.3.0", f"cannot build webhook JSON: {exc}")
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
            return for_all(recipients, deferred, "4.4.2", text, remote_mta=remote)
        except aiohttp.ClientConnectorCertificateError as exc:
            text = f"webhook TLS certificate not trusted: {one_line(str(exc.certificate_error))}"
            return for_all(recipients, deferred, "4.7.5", text, remote_mta=remote)
        except aiohttp.ClientConnectorError as exc:
            text = f"webhook connection failed: {one_line(str(exc.os_error) or str(exc))}"
            return for_all(recipients, deferred, "4.4.1", text, remote_mta=remote)
        except (aiohttp.ClientError, OSError) as exc:
            text = f"webhook request failed: {one_line(str(exc) or type(exc).__name__)}"
            return for_all(recipients, deferred, "4.4.2", text, remote_mta=remote)
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
            return for_all(recipients, delivered, said, remote_mta=remote, relayed=True)
        if status >= 500 or status in (408, 429) or 300 <= status < 400 or status < 200:
            return for_all(recipients, deferred, "4.3.0", said, remote_mta=remote)
        return for_all(recipients, bounced, "5.0.0", said, remote_mta=remote)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
