"""What the front stores for a message it received: the refusals after the final dot, the trace
header, the submission headers and the queue entry.

`prepare_message` takes the DATA decoder's result and the transaction and gives either a
`Refused` (a content problem the decoder found: ``552 5.3.4`` size, ``554 5.6.0`` NUL or a line
over 998 octets; the hop limit reached, ``554 5.4.6``, RFC 5321 6.3; or a ``From:`` address the
login may not use, ``553 5.7.1``, relay.core.senders) or a `Prepared`: the one
``Received:`` field this hop adds on top (relay.core.received), on a submission listener the
``Date:``/``Message-ID:`` the message lacks (RFC 6409 8), and the `QueueEntry` (envelope, all
recipients pending, arrival time, client address and HELO name).

What it must not do: store, count metrics, log or answer (the front stores with
``await spool.store`` and answers 250 only after it returned). Pure: the time and the random
Message-ID token are arguments; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from relay.core import status
from relay.core.model import Envelope, QueueEntry, Recipient
from relay.core.received import TraceInfo, build_received, count_received, protocol_name, submission_headers
from relay.core.senders import foreign_from, not_owned
from relay.core.smtp_data import DataDecoder
from relay.core.smtp_payload import clean_payload
from relay.core.smtp_syntax import MailParams
from relay.core.status import Reply


@dataclass(frozen=True)
class Arrival:
    """How a message came in: what the trace header and the queue entry record of its client."""

    client_ip: str
    helo: str
    esmtp: bool
    secure: bool  # over TLS (STARTTLS or implicit)
    tls: str | None  # the TLS session for the Received comment, when known
    authenticated: bool
    submission: bool  # a submission listener: add a missing Date and Message-ID
    arrival: float  # epoch seconds
    when: datetime  # the same instant, time-zone aware (the Received date)
    protocol: str | None = None  # the Received ``with`` keyword when not SMTP's (``HTTP``)
    login: str | None = None  # the authenticated user
    senders: tuple[str, ...] | None = None  # the login's allowed senders (relay.core.senders)


@dataclass(frozen=True)
class Prepared:
    entry: QueueEntry
    data: bytes  # the trace (and submission) headers, then the content: what the spool stores
    size: int  # of the content as received (after normalisation)
    normalized: bool  # bare CR or LF were turned into CRLF


@dataclass(frozen=True)
class Refused:
    reply: Reply
    reason: str  # the mailrelay_rejected reason
    log: str  # what to log after the queue id


def prepare_message(
    decoder: DataDecoder,
    *,
    queue_id: str,
    mail_from: str,
    params: MailParams,
    recipients: tuple[Recipient, ...],
    arrival: Arrival,
    hostname: str,
    max_hops: int,
    new_token: Callable[[], str],
) -> Prepared | Refused:
    """Judge a completely received message and build what the spool stores."""
    if decoder.problem is not None:
        reason = "size" if decoder.problem is status.SIZE_EXCEEDED else "content"
        return Refused(decoder.problem, reason, f"message refused: {decoder.problem}")
    content = decoder.content()
    hops = count_received(content)
    if hops >= max_hops:
        return Refused(
            status.TOO_MANY_HOPS, "loop", f"message refused: {hops} Received headers (limit {max_hops})"
        )
    foreign = foreign_from(content, arrival.senders)
    if foreign is not None:
        return Refused(
            not_owned(foreign, arrival.login or ""),
            "sender_login_mismatch",
            f"message refused: From <{foreign}> not owned by user {arrival.login}",
        )
    trace = TraceInfo(
        helo=arrival.helo,
        client_ip=arrival.client_ip,
        hostname=hostname,
        protocol=arrival.protocol
        or protocol_name(
            esmtp=arrival.esmtp,
            tls=arrival.secure,
            authenticated=arrival.authenticated,
            smtputf8=params.smtputf8,
        ),
        queue_id=queue_id,
        recipients=tuple(r.address for r in recipients),
        when=arrival.when,
        tls=arrival.tls,
    )
    head = build_received(trace)
    if arrival.submission:
        head += submission_headers(
            content, when=arrival.when, queue_id=queue_id, hostname=hostname, token=new_token()
        )
    entry = QueueEntry(
        queue_id=queue_id,
        envelope=Envelope(
            mail_from=mail_from,
            recipients=recipients,
            body=params.body,
            smtputf8=params.smtputf8,
            ret=params.ret,
            envid=params.envid,
        ),
        arrival=arrival.arrival,
        pending=recipients,
        client_address=arrival.client_ip,
        helo=arrival.helo,
        size=len(head) + len(content),  # what the spool stores
        wire_ready=decoder.wire_ready and clean_payload(head) == head + b".\r\n",
    )
    return Prepared(entry, head + content, len(content), decoder.normalized)
