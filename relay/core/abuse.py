"""Abuse limits per client address (Postfix's anvil and postscreen, across worker processes):
what a count means. relay.abuse keeps the counts in a store every worker shares; this module
decides, from what the store read, whether a connection, an AUTH failure or a message is
refused and whether the address is now blocked.

Rules (``abuse`` in the config, relay.config.AbuseConfig):

- A blocked address (``authFailures`` failed AUTH within one ``window``) gets ``421 4.7.0`` for
  every new connection, AUTH and MAIL until ``blockFor`` has passed, from every worker, also
  after a restart.
- More concurrent connections than ``limits.maxConnectionsPerClient`` over all workers: ``421
  4.7.0``; more new connections than ``abuse.connections`` in a window: ``421 4.7.0``.
- More MAIL commands than ``abuse.messages`` in a window: ``421 4.7.0`` and the session ends.
- Trusted networks are exempt from the two rate limits and from the pregreet test, not from
  blocks or the concurrency limit.

Counting is in fixed windows (`advance`): cheap, and the edge effect (up to twice the limit
across a window boundary) is what Postfix's anvil has too. Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import AbuseConfig, LimitsConfig
from relay.core import status
from relay.core.status import Reply


@dataclass(frozen=True)
class Window:
    """A fixed-window counter: `count` events since `start`."""

    start: float
    count: int


def advance(window: Window | None, now: float, length: float) -> Window:
    """The counter after one more event at `now`."""
    if window is None or now - window.start >= length or now < window.start:
        return Window(now, 1)
    return Window(window.start, window.count + 1)


def is_blocked(until: float | None, now: float) -> bool:
    return until is not None and now < until


def block_after_failure(failures: Window, now: float, abuse: AbuseConfig) -> float | None:
    """Until when the address is blocked after an AUTH failure that made `failures`; None: not."""
    if abuse.auth_failures and failures.count >= abuse.auth_failures:
        return now + abuse.block_for
    return None


def connection_refusal(
    *,
    blocked_until: float | None,
    live: int,
    recent: Window | None,
    trusted: bool,
    now: float,
    limits: LimitsConfig,
    abuse: AbuseConfig,
) -> tuple[Reply, str] | None:
    """(reply, rejected reason) for a new connection that counts as `live` concurrent ones over
    all workers (itself included) and `recent` (itself included) in the window; None admits it."""
    if is_blocked(blocked_until, now):
        return status.CLIENT_BLOCKED, "blocked"
    if live > limits.max_connections_per_client:
        return status.TOO_MANY_CONNECTIONS_FROM_YOU, "connections"
    if not trusted and abuse.connections and recent is not None and recent.count > abuse.connections:
        return status.TOO_MANY_CONNECTIONS_RATE, "connection_rate"
    return None


def message_refusal(*, recent: Window, trusted: bool, abuse: AbuseConfig) -> tuple[Reply, str] | None:
    """(reply, rejected reason) for a MAIL that made `recent`; None accepts it."""
    if not trusted and abuse.messages and recent.count > abuse.messages:
        return status.TOO_MUCH_MAIL, "messages"
    return None
