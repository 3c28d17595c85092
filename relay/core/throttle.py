"""Per-destination rate limits and adaptive backoff: the arithmetic of relay.throttle.

A route's ``limits`` (relay.config.RouteLimits) give a budget of messages per second and per
hour, and a number of connections; with ``perDestination`` each destination of the route has
its own budget, otherwise the route shares one. A destination is the MX rollup of an MX hop
(`rollup`: every MX host of a provider counts as one destination) or the host of a relay or
smarthost hop.

Budgets are GCRA token buckets (the "theoretical arrival time" form of a token bucket with a
burst of one): one float per limit, so a bucket fits in a few bytes of the table the workers of
one relay share (relay.throttle). `admit` reserves the next slot of every limit and says how
long to wait for it; a reservation further out than `max_wait` is refused (the caller defers
the mail with 451 4.7.0 rather than holding a delivery slot for minutes).

Adaptive backoff (`throttled`, `succeeded`): a destination that answers 421, or a 4xx with an
enhanced status 4.7.x or a "slow down / try later / too many" text (`is_throttle_reply`), has its
`factor` halved (down to `MIN_FACTOR`: the configured rate and the connections are multiplied
by it) and is paused for a penalty that doubles with each throttle (1 s up to `MAX_PENALTY`).
Each success after the pause raises the factor by `RECOVERY_STEP`, at most once per
`RECOVERY_INTERVAL`, and halves the penalty: recovery takes several seconds of good answers,
not one.

Per-sender abuse caps on a listener (`sender_cap`): each authenticated user, else each MAIL
FROM domain (`sender_key`), may start so many messages per minute and per hour; a cap allows a
burst of its whole count, then one message per period/count.

Pure: no clock (``now`` is passed in), no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from relay.config import RouteLimits

MIN_FACTOR = 1 / 16
BASE_PENALTY = 1.0
MAX_PENALTY = 300.0
RECOVERY_STEP = 0.125
RECOVERY_INTERVAL = 1.0

_THROTTLE_TEXT = re.compile(
    r"rate|too many|slow(?:ing)? down|try (?:again )?later|throttl|temporarily deferred|exceeded", re.I
)
_TWO_LEVEL_SUFFIX = {"co", "com", "net", "org", "ac", "gov", "edu", "ne", "or", "go"}


@dataclass(frozen=True)
class Bucket:
    """What the shared table keeps per key (all times in the monotonic clock's seconds)."""

    second_tat: float = 0.0  # theoretical arrival time of the next message under messagesPerSecond
    hour_tat: float = 0.0  # the same under messagesPerHour
    factor: float = 1.0  # adaptive: 1 = full rate, MIN_FACTOR after repeated throttling
    paused_until: float = 0.0
    penalty: float = 0.0
    changed_at: float = 0.0  # last throttle or recovery step


@dataclass(frozen=True)
class Admission:
    """`wait` seconds before sending, or refused (`wait` None) with the reason."""

    wait: float | None
    reason: str = ""


def rollup(hosts: Sequence[str]) -> str:
    """The destination of an MX hop: the registered domain of its most preferred host
    (``gmail-smtp-in.l.google.com`` → ``google.com``; ``mx1.mail.example.co.uk`` →
    ``example.co.uk``), so every MX host of one provider shares one budget. Without a public
    suffix list, a two-letter top-level domain under a common second level (co, com, net, org,
    ac, gov, edu, ne, or, go) keeps three labels."""
    if not hosts:
        return ""
    labels = hosts[0].lower().rstrip(".").split(".")
    keep = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _TWO_LEVEL_SUFFIX else 2
    return ".".join(labels[-keep:])


# Statuses the relay itself gives a failed connection, TLS or AUTH step, and a key it cannot
# use: these are no request to slow down.
_OWN_STATUSES = ("4.4.", "4.7.5", "4.7.10", "4.7.8", "4.3.5")


def is_throttle_reply(code: int, status: str, text: str) -> bool:
    """Whether a reply asks us to slow down: 421 (the server closes the session), a 4xx with
    enhanced status 4.7.x, or a 4xx whose text says rate / too many / slow down / try later;
    not a failed connection (4.4.x), TLS (4.7.5, 4.7.10) or AUTH (4.7.8) step."""
    if not 400 <= code < 500 or status.startswith(_OWN_STATUSES):
        return False
    return code == 421 or status.startswith("4.7.") or bool(_THROTTLE_TEXT.search(text))


def _reserve(tat: float, now: float, interval: float) -> tuple[float, float]:
    """(wait, new tat) for one message under a GCRA bucket with a burst of one."""
    start = max(tat, now)
    return start - now, start + interval


def admit(bucket: Bucket, limits: RouteLimits, now: float, max_wait: float) -> tuple[Bucket, Admission]:
    """Reserve one message's place under every limit of `limits` (scaled by the bucket's
    adaptive factor) and under its pause; refuse when the wait would exceed `max_wait`."""
    factor = max(MIN_FACTOR, min(1.0, bucket.factor))
    wait = max(0.0, bucket.paused_until - now)
    reason = "backoff" if wait > 0 else ""
    second_tat, hour_tat = bucket.second_tat, bucket.hour_tat
    if limits.messages_per_second:
        waited, second_tat = _reserve(second_tat, now, 1.0 / (limits.messages_per_second * factor))
        if waited > wait:
            wait, reason = waited, "messagesPerSecond"
    if limits.messages_per_hour:
        waited, hour_tat = _reserve(hour_tat, now, 3600.0 / (limits.messages_per_hour * factor))
        if waited > wait:
            wait, reason = waited, "messagesPerHour"
    if wait > max_wait:
        return bucket, Admission(None, reason)
    return replace(bucket, second_tat=second_tat, hour_tat=hour_tat), Admission(wait, reason)


def throttled(bucket: Bucket, now: float) -> Bucket:
    """The destination asked us to slow down: halve the factor, pause for a doubled penalty."""
    penalty = min(MAX_PENALTY, max(BASE_PENALTY, bucket.penalty * 2))
    return replace(
        bucket,
        factor=max(MIN_FACTOR, bucket.factor / 2),
        penalty=penalty,
        paused_until=max(bucket.paused_until, now + penalty),
        changed_at=now,
    )


def succeeded(bucket: Bucket, now: float) -> Bucket:
    """A delivery went through: after the pause, one recovery step per `RECOVERY_INTERVAL`."""
    if bucket.factor >= 1.0 and bucket.penalty == 0.0:
        return bucket
    if now < bucket.paused_until or now - bucket.changed_at < RECOVERY_INTERVAL:
        return bucket
    factor = min(1.0, bucket.factor + RECOVERY_STEP)
    penalty = bucket.penalty / 2 if bucket.penalty > BASE_PENALTY else 0.0
    return replace(bucket, factor=factor, penalty=penalty, changed_at=now)


def connection_cap(limit: int, factor: float) -> int:
    """Connections allowed to a destination under backoff: the limit scaled, at least one."""
    return max(1, math.ceil(limit * max(MIN_FACTOR, min(1.0, factor))))


def per_worker(connections: int, workers: int) -> int:
    """A route's ``connections`` split over the worker processes, at least one each."""
    return max(1, connections // max(1, workers))


# --------------------------------------------------------------------------- per-sender caps


def sender_key(login: str | None, mail_from: str) -> str:
    """Whose budget a new message counts against: the authenticated user, else the domain of
    the envelope sender (``<>`` for the null sender)."""
    if login:
        return f"user:{login}"
    _local, at, domain = mail_from.rpartition("@")
    return f"domain:{domain.lower()}" if at and domain else "domain:<>"


def _cap(tat: float, now: float, count: int, period: float) -> tuple[float, bool]:
    """A GCRA cap: `count` messages in any `period` (a burst of `count`, then one per
    period/count); (new tat, allowed). A refused message takes nothing from the budget."""
    after = max(tat, now) + period / count
    return (after, True) if after - now <= period else (tat, False)


def sender_cap(
    bucket: Bucket, per_minute: int | None, per_hour: int | None, now: float
) -> tuple[Bucket, bool]:
    """Count one message against a sender's caps (per minute in `second_tat`, per hour in
    `hour_tat`); False when either cap is reached (the front answers 450 4.7.0)."""
    minute_tat, hour_tat = bucket.second_tat, bucket.hour_tat
    if per_minute:
        minute_tat, allowed = _cap(minute_tat, now, per_minute, 60.0)
        if not allowed:
            return bucket, False
    if per_hour:
        hour_tat, allowed = _cap(hour_tat, now, per_hour, 3600.0)
        if not allowed:
            return bucket, False
    return replace(bucket, second_tat=minute_tat, hour_tat=hour_tat), True
