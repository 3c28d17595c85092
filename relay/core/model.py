"""Value types of a message's life: envelope, recipients, queue entries and delivery outcomes.

Every module of the relay speaks these types: the front builds an `Envelope`, the spool stores a
`QueueEntry`, the scheduler hands recipients to a `Transport` (SMTP delivery or a gateway) and
gets one `RecipientOutcome` per recipient back. Pure data: no I/O, no clock, no sockets.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from relay.core.dkim import SigningPlan


class Disposition(enum.Enum):
    """What became of one recipient after one attempt (RFC 5321 4.2.1: 2yz, 4yz, 5yz)."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True)
class Recipient:
    """One envelope recipient with its RFC 3461 DSN parameters."""

    address: str
    notify: tuple[str, ...] = ()  # NEVER | SUCCESS, FAILURE, DELAY; empty = not given
    # RFC 3461 4.2 ORCPT as received on the wire: "addr-type;xtext" with the type lower-cased
    # and the address still xtext-encoded ("rfc822;user+2Btag@example.com"); relay.delivery
    # passes it on unchanged and relay.core.dsn decodes it for Original-Recipient.
    orcpt: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"a": self.address}
        if self.notify:
            data["n"] = list(self.notify)
        if self.orcpt:
            data["o"] = self.orcpt
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipient:
        return cls(address=data["a"], notify=tuple(data.get("n", ())), orcpt=data.get("o"))


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope: reverse path, forward paths and the MAIL parameters that travel on."""

    mail_from: str  # "" is the null reverse path <>
    recipients: tuple[Recipient, ...]
    body: str | None = None  # "7BIT" | "8BITMIME" | None
    smtputf8: bool = False
    ret: str | None = None  # "FULL" | "HDRS"
    envid: str | None = None  # RFC 3461 4.4 ENVID in xtext wire form (decoded only in a DSN)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"f": self.mail_from, "r": [r.to_json() for r in self.recipients]}
        if self.body:
            data["b"] = self.body
        if self.smtputf8:
            data["u"] = True
        if self.ret:
            data["ret"] = self.ret
        if self.envid:
            data["env"] = self.envid
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        return cls(
            mail_from=data["f"],
            recipients=tuple(Recipient.from_json(r) for r in data["r"]),
            body=data.get("b"),
            smtputf8=bool(data.get("u", False)),
            ret=data.get("ret"),
            envid=data.get("env"),
        )


@dataclass(frozen=True)
class RecipientOutcome:
    """The result of one attempt for one recipient, with everything a DSN needs."""

    recipient: Recipient
    disposition: Disposition
    code: int  # SMTP reply code (or the code we chose for a local failure)
    status: str  # enhanced status code, e.g. "5.1.1" (RFC 3463)
    text: str  # reply text / diagnostic
    remote_mta: str | None = None  # host that answered, for DSN Remote-MTA
    relayed: bool = False  # delivered to a hop without DSN support (RFC 3461 "relayed")

    def to_json(self) -> dict[str, Any]:
        return {
            "r": self.recipient.to_json(),
            "d": self.disposition.value,
            "c": self.code,
            "s": self.status,
            "t": self.text,
            "m": self.remote_mta,
            "rl": self.relayed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecipientOutcome:
        return cls(
            recipient=Recipient.from_json(data["r"]),
            disposition=Disposition(data["d"]),
            code=int(data["c"]),
            status=data["s"],
            text=data["t"],
            remote_mta=data.get("m"),
            relayed=bool(data.get("rl", False)),
        )


@dataclass(frozen=True)
class QueueEntry:
    """A message's durable state: what the spool writes in the header of the queue file.

    `pending` are the recipients still to be delivered; `results` keeps the final outcomes
    (delivered or bounced) and the last deferral of each recipient, which the DSN reports.
    """

    queue_id: str
    envelope: Envelope
    arrival: float  # epoch seconds the message was accepted
    pending: tuple[Recipient, ...]
    attempts: int = 0
    next_attempt: float = 0.0  # epoch seconds; 0 = as soon as possible
    results: tuple[RecipientOutcome, ...] = ()
    client_address: str = ""  # who handed it to us (for Received and DSN)
    helo: str = ""
    size: int = 0  # bytes of message content
    dsn_sent: tuple[str, ...] = ()  # recipients already reported in a DSN (delay warnings)
    held: bool = False
    # The front checked the content on arrival: CRLF lines, none starting with a dot, so it goes
    # to a next hop as it is (relay.core.smtp_payload.data_payload skips its scan of the body).
    wire_ready: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "v": 1,
            "id": self.queue_id,
            "env": self.envelope.to_json(),
            "arr": self.arrival,
            "p": [r.to_json() for r in self.pending],
            "att": self.attempts,
            "nxt": self.next_attempt,
            "res": [o.to_json() for o in self.results],
            "ca": self.client_address,
            "helo": self.helo,
            "sz": self.size,
            "dsn": list(self.dsn_sent),
            "hold": self.held,
        }
        if self.wire_ready:
            data["wr"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueEntry:
        if data.get("v") != 1:
            raise ValueError(f"unknown queue entry version {data.get('v')!r}")
        return cls(
            queue_id=data["id"],
            envelope=Envelope.from_json(data["env"]),
            arrival=float(data["arr"]),
            pending=tuple(Recipient.from_json(r) for r in data["p"]),
            attempts=int(data.get("att", 0)),
            next_attempt=float(data.get("nxt", 0.0)),
            results=tuple(RecipientOutcome.from_json(o) for o in data.get("res", ())),
            client_address=data.get("ca", ""),
            helo=data.get("helo", ""),
            size=int(data.get("sz", 0)),
            dsn_sent=tuple(data.get("dsn", ())),
            held=bool(data.get("hold", False)),
            wire_ready=bool(data.get("wr", False)),
        )

    def with_changes(self, **changes: Any) -> QueueEntry:
        return replace(self, **changes)


@dataclass(frozen=True)
class Message:
    """A queued message as handed to a transport: its state and its content (CRLF lines)."""

    entry: QueueEntry
    content: bytes


@dataclass(frozen=True)
class DeliveryRequest:
    """One transaction's worth of work for a transport: one message, recipients for one hop."""

    message: Message
    recipients: tuple[Recipient, ...]
    dkim: SigningPlan | None = None  # relay.core.dkim: sign before this hop (SMTP hops only)


class Transport(Protocol):
    """Carries one message to one next hop. SMTP delivery and every gateway implement this.

    It must return exactly one outcome per requested recipient and must not raise for
    delivery failures (a down host is DEFERRED outcomes, not an exception).
    """

    async def deliver(self, request: DeliveryRequest) -> Sequence[RecipientOutcome]: ...

    async def close(self) -> None: ...
