"""Trace headers: the one ``Received:`` line each hop adds, hop counting for loop detection, and
the ``Message-ID``/``Date`` a submission server adds when they are missing.

- RFC 5321 4.4: every SMTP server that accepts a message for relaying inserts exactly one
  ``Received:`` field at the top: ``from`` (the EHLO name and the client's address literal),
  ``by`` (our hostname), ``with`` (the protocol name of RFC 3848 / RFC 6531: ESMTP, ESMTPS,
  ESMTPA, ESMTPSA, UTF8SMTP, ...), ``id`` (the queue id), ``for`` (only when there is a single
  recipient, so one message does not leak the others) and the date. TLS version and cipher go
  in a comment, as Postfix writes them.
- RFC 5321 6.3: a message whose ``Received:`` count reaches the hop limit is in a loop
  (``554 5.4.6``); relay.core.accept calls `count_received` before the front stores a message.
- RFC 6409 8.2/8.3: a message submission agent may add a missing ``Date:`` and ``Message-ID:``.

Pure functions over bytes; the time and randomness are arguments. Called by relay.core.accept (what the
front stores); the header section is found by relay.core.headers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from relay.core.headers import header_names, header_section


def count_received(content: bytes) -> int:
    """How many ``Received:`` fields the message's header carries (RFC 5321 6.3 hop count)."""
    headers = header_section(content)
    if b"eceived" not in headers and b"ECEIVED" not in headers:
        return 0
    return sum(1 for name in header_names(headers) if name == "received")


def protocol_name(*, esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The ``with`` keyword (RFC 3848 section 2, RFC 6531 3.7.3)."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


@dataclass(frozen=True)
class TraceInfo:
    """What one hop knows about a message when it writes its Received field."""

    helo: str
    client_ip: str
    hostname: str  # ours
    protocol: str  # protocol_name(...)
    queue_id: str
    recipients: tuple[str, ...]
    when: datetime  # timezone-aware
    client_name: str | None = None  # reverse DNS, when known
    tls: str | None = None  # e.g. "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"


def _ip_literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


@functools.lru_cache(maxsize=4)
def _rfc5322_date(when: datetime) -> str:
    return format_datetime(when)


def rfc5322_date(when: datetime) -> str:
    """RFC 5322 3.3 date-time (whole seconds), formatted once per second and zone."""
    return _rfc5322_date(when.replace(microsecond=0))


def build_received(info: TraceInfo) -> bytes:
    """One ``Received:`` field, folded, ending with CRLF."""
    tcp_info = (
        _ip_literal(info.client_ip)
        if not info.client_name
        else f"{info.client_name} {_ip_literal(info.client_ip)}"
    )
    helo = info.helo or "unknown"
    lines = [f"Received: from {helo} ({tcp_info})"]
    if info.tls:
        lines.append(f"\t(using {info.tls})")
    lines.append(f"\tby {info.hostname} (mailrelay) with {info.protocol} id {info.queue_id}")
    when = rfc5322_date(info.when)
    if len(info.recipients) == 1:
        lines.append(f"\tfor <{info.recipients[0]}>; {when}")
    else:
        lines.append(f"\t; {when}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def date_header(when: datetime) -> bytes:
    return f"Date: {rfc5322_date(when)}\r\n".encode("ascii")


def message_id_header(queue_id: str, hostname: str, token: str) -> bytes:
    return f"Message-ID: <{queue_id}.{token}@{hostname}>\r\n".encode("ascii", "replace")


def submission_headers(content: bytes, *, when: datetime, queue_id: str, hostname: str, token: str) -> bytes:
    """The ``Date:`` and ``Message-ID:`` fields a submission server adds (RFC 6409 8.2, 8.3)."""
    names = header_names(header_section(content))
    added = b""
    if "date" not in names:
        added += date_header(when)
    if "message-id" not in names:
        added += message_id_header(queue_id, hostname, token)
    return added
