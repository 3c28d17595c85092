"""Settlement (Postfix's qmgr "done or defer"): what one delivery attempt means for its message.

The scheduler collects one `Attempted` per recipient it tried (the outcome, the route, whether a
gateway stored it for good) and calls `settle`; the `Settlement` says what to write:

- a recipient still deferred when the message has outlived ``maxLifetime`` bounces with 4.4.7
  (relay.core.outcome.expire; relay.core.policy decides the expiry);
- the reports owed to the sender now are relay.core.dsn.reportable's choice: failures, SUCCESS
  notifications, and one "delayed" warning per recipient once the message is older than the
  delay-warning age (a recipient already warned, `QueueEntry.dsn_sent`, gets none again);
  never any for a message from ``<>``;
- when every recipient is final (delivered or bounced) the message is done; otherwise the
  entry to write back has the deferred recipients as `pending`, one more attempt, the next
  attempt time of relay.core.policy (exponential backoff, never after the expiry), every
  recipient's latest outcome in `results` and the recipients warned so far in `dsn_sent`.

The scheduler stores the DSN *before* it completes or defers the original (a crash can
duplicate a DSN, never lose one). Pure: no I/O; the time is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.config import RetryPolicyConfig
from relay.core import dsn, outcome, policy
from relay.core.model import QueueEntry, RecipientOutcome


@dataclass(frozen=True)
class Attempted:
    """One recipient's outcome of this attempt, with where it went."""

    outcome: RecipientOutcome
    route: str  # the route's name (metrics label), or "(none)" for an unrouted recipient
    final_delivery: bool = False  # delivered by a gateway: a DSN "delivered", not "relayed"
    expired: bool = False  # bounced by settle because the message outlived maxLifetime


@dataclass(frozen=True)
class Settlement:
    """What to record for one attempt."""

    results: tuple[Attempted, ...]  # as settled: expired deferrals are bounces now
    reports: tuple[dsn.Report, ...]  # the DSN owed to the sender now; empty: none
    deferred: QueueEntry | None  # the entry to write back to deferred/; None: the message is done


def settle(
    entry: QueueEntry,
    results: Sequence[Attempted],
    *,
    now: float,
    retry: RetryPolicyConfig,
    delay_warning_after: float,
) -> Settlement:
    """Expire, pick the reports, and decide done or the deferred entry (see the module doc)."""
    expired = policy.is_expired(now, entry.arrival, retry)
    settled = tuple(
        Attempted(outcome.expire(r.outcome), r.route, r.final_delivery, expired=True)
        if expired and not outcome.is_final(r.outcome)
        else r
        for r in results
    )
    reports = tuple(
        dsn.reportable(
            entry.envelope,
            [r.outcome for r in settled],
            final_delivery=[r.final_delivery for r in settled],
            delay_warning=now - entry.arrival >= delay_warning_after,
            already_warned=entry.dsn_sent,
        )
    )
    pending = tuple(r.outcome.recipient for r in settled if not outcome.is_final(r.outcome))
    if not pending:
        return Settlement(settled, reports, None)
    attempts = entry.attempts + 1
    latest = {o.recipient.address: o for o in entry.results}
    latest.update((r.outcome.recipient.address, r.outcome) for r in settled)
    warned = [r.outcome.recipient.address for r in reports if r.action == "delayed"]
    deferred = entry.with_changes(
        pending=pending,
        attempts=attempts,
        next_attempt=policy.next_attempt(now, entry.arrival, attempts, retry),
        results=tuple(latest.values()),
        dsn_sent=tuple(dict.fromkeys((*entry.dsn_sent, *warned))),
    )
    return Settlement(settled, reports, deferred)


def summary(results: Sequence[Attempted]) -> str:
    """``a@d=delivered 250 2.0.0, b@d=deferred 451 4.3.0`` for the log line of an attempt."""
    return ", ".join(
        f"{r.outcome.recipient.address}={r.outcome.disposition.value} {r.outcome.code} {r.outcome.status}"
        for r in results
    )
