"""Mail gateways: carry a queued message out of the SMTP world (``nextHop.gateway``).

`build_gateway(hop, config)` turns a `GatewayHop` into a `relay.core.model.Transport`; the scheduler
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
order, and never raises for a delivery failure (docs/DESIGN.md section 6). Blocking file work runs in
a thread. Metrics, retries and DSNs are the scheduler's business, not this module's.
"""

from __future__ import annotations

from relay.config import GatewayHop, RelayConfig
from relay.core.model import Transport
from relay.gateways.maildir import MaildirTransport, folder_name, maildir_copy, maildir_for
from relay.gateways.pipe import PipeTransport
from relay.gateways.webhook import WebhookTransport, webhook_json

__all__ = [
    "GatewayConfigError",
    "MaildirTransport",
    "PipeTransport",
    "WebhookTransport",
    "build_gateway",
    "folder_name",
    "maildir_copy",
    "maildir_for",
    "webhook_json",
]


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
