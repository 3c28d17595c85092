"""Outcome: what one reply (or one failure) means for one recipient.

RFC 5321 4.2.1 reply classes: 2yz delivered, 4yz transient (deferred, retried later), 5yz
permanent (bounced). Enhanced status codes (RFC 3463) are taken from the reply text when the
server sent one (RFC 2034), otherwise derived from the reply class (X.0.0). Local failures get
fixed codes: a connection that could not be made or broke is deferred with 4.4.1 / 4.4.2, a
recipient still deferred when the message outlives maxLifetime bounces with 4.4.7 (RFC 3463:
"delivery time expired", reported as a permanent failure with the 4.4.7 status, as Postfix does).
A transport owes exactly one outcome per recipient: `one_each` defers (4.3.0) any it left out.

Every outcome is built here: SMTP delivery (relay.smtp_transaction) with `from_reply` and the
connection helpers, the gateways with `delivered`, `deferred`, `bounced` and `for_all`, the
scheduler's hops (relay.hops) with `one_each`; relay.core.settle uses `expire` and `is_final`,
and relay.core.dsn `diagnostic`. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Concatenate, ParamSpec

from relay.core.model import Disposition, Recipient, RecipientOutcome

P = ParamSpec("P")

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def disposition_for(code: int) -> Disposition:
    """2yz delivered, 4yz deferred, anything else (5yz, garbage) bounced."""
    if 200 <= code < 300:
        return Disposition.DELIVERED
    if 400 <= code < 500:
        return Disposition.DEFERRED
    return Disposition.BOUNCED


def split_enhanced(code: int, text: str) -> tuple[str, str]:
    """(enhanced status, text without it). The status class always agrees with the reply code:
    a server answering ``550 4.1.1`` is treated as 5.1.1 (the reply code is authoritative)."""
    klass = str(code)[0] if 200 <= code < 600 else "5"
    match = _ENHANCED.match(text)
    if match:
        status = f"{klass}.{match.group(2)}.{match.group(3)}"
        return status, text[match.end() :].strip()
    return f"{klass}.0.0", text.strip()


def from_reply(
    recipient: Recipient,
    code: int,
    text: str,
    *,
    remote_mta: str | None = None,
    relayed: bool = False,
) -> RecipientOutcome:
    """The outcome of an SMTP reply (RCPT, or the reply after DATA) for one recipient."""
    status, rest = split_enhanced(code, text)
    disposition = disposition_for(code)
    return RecipientOutcome(
        recipient=recipient,
        disposition=disposition,
        code=code,
        status=status,
        text=" ".join(rest.split()),
        remote_mta=remote_mta,
        relayed=relayed and disposition is Disposition.DELIVERED,
    )


def delivered(
    recipient: Recipient, text: str = "delivered", *, remote_mta: str | None = None, relayed: bool = False
) -> RecipientOutcome:
    """Delivered by a gateway: stored for good (a Maildir), or handed off to a system that
    sends no DSN of its own (`relayed`: a webhook, a pipe command)."""
    return RecipientOutcome(recipient, Disposition.DELIVERED, 250, "2.0.0", text, remote_mta, relayed)


def deferred(
    recipient: Recipient, status: str, text: str, *, code: int = 451, remote_mta: str | None = None
) -> RecipientOutcome:
    """A transient local failure (status must be 4.x.x)."""
    if not status.startswith("4."):
        raise ValueError(f"a deferral needs a 4.x.x status, not {status}")
    return RecipientOutcome(recipient, Disposition.DEFERRED, code, status, text, remote_mta)


def bounced(
    recipient: Recipient, status: str, text: str, *, code: int = 550, remote_mta: str | None = None
) -> RecipientOutcome:
    """A permanent failure (status 5.x.x, or 4.4.7 for an expired lifetime)."""
    return RecipientOutcome(recipient, Disposition.BOUNCED, code, status, text, remote_mta)


def connection_failed(
    recipient: Recipient, detail: str, *, remote_mta: str | None = None
) -> RecipientOutcome:
    """No connection could be made (refused, unreachable, timed out): 4.4.1 (RFC 3463)."""
    return deferred(recipient, "4.4.1", f"connection failed: {detail}", code=421, remote_mta=remote_mta)


def connection_broken(
    recipient: Recipient, detail: str, *, remote_mta: str | None = None
) -> RecipientOutcome:
    """The connection broke or timed out during the transaction: 4.4.2 (RFC 3463)."""
    return deferred(recipient, "4.4.2", f"connection lost: {detail}", code=421, remote_mta=remote_mta)


def expire(outcome: RecipientOutcome) -> RecipientOutcome:
    """A recipient still deferred after maxLifetime: bounced with 4.4.7, keeping the last reason."""
    reason = outcome.text
    if outcome.code and outcome.status:
        reason = f"{outcome.code} {outcome.status} {outcome.text}"
    return RecipientOutcome(
        recipient=outcome.recipient,
        disposition=Disposition.BOUNCED,
        code=outcome.code or 451,
        status="4.4.7",
        text=f"delivery time expired; last error: {reason}",
        remote_mta=outcome.remote_mta,
    )


def is_final(outcome: RecipientOutcome) -> bool:
    """Delivered and bounced recipients are done; deferred ones stay in the queue."""
    return outcome.disposition is not Disposition.DEFERRED


def for_all(
    recipients: Sequence[Recipient],
    make: Callable[Concatenate[Recipient, P], RecipientOutcome],
    *args: P.args,
    **kwargs: P.kwargs,
) -> list[RecipientOutcome]:
    """The same outcome for every recipient: ``for_all(rcpts, deferred, "4.4.1", text)``."""
    return [make(recipient, *args, **kwargs) for recipient in recipients]


def one_each(recipients: Sequence[Recipient], outcomes: Sequence[RecipientOutcome]) -> list[RecipientOutcome]:
    """Exactly one outcome per recipient, in order (a transport that broke the contract defers
    the recipients it forgot)."""
    by_address = {o.recipient.address: o for o in outcomes}
    return [
        by_address.get(r.address)
        or deferred(r, "4.3.0", "the transport returned no outcome for this recipient")
        for r in recipients
    ]


def diagnostic(outcome: RecipientOutcome) -> str:
    """The RFC 3464 Diagnostic-Code value: ``smtp; 550 5.1.1 text`` for a remote MTA's reply,
    ``x-mailrelay; 451 4.4.1 text`` for a local decision (no remote MTA)."""
    kind = "smtp" if outcome.remote_mta else "x-mailrelay"
    return f"{kind}; {outcome.code} {outcome.status} {outcome.text}".strip()
