"""Retry policy: when a deferred recipient is tried again, and when it is given up.

Pure arithmetic on `RetryPolicyConfig` (queue.retry in the relay config); relay.core.settle
calls it after every attempt that leaves recipients deferred (the scheduler too, for a deferral
after a failed attempt and for a DSN's Will-Retry-Until). Exponential backoff (RFC 5321
4.5.4.1 asks for a retry interval of at least 30 minutes on the public Internet and a give-up
time of 4-5 days; both are configurable here): the n-th retry waits ``minBackoff * 2**(n-1)``,
capped at ``maxBackoff``. A message older than ``maxLifetime`` is expired: its deferred recipients bounce
with 4.4.7 (RFC 3463 "delivery time expired"). The next attempt is never scheduled after the
expiry time, so the bounce is not late by up to one backoff.

No clock of its own: callers pass ``now``.
"""

from __future__ import annotations

from relay.config import RetryPolicyConfig

_MAX_EXPONENT = 32  # 2**32 * any sane minBackoff already exceeds every maxBackoff


def backoff(attempts: int, policy: RetryPolicyConfig) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1 = the first attempt failed)."""
    exponent = min(max(attempts, 1) - 1, _MAX_EXPONENT)
    return float(min(policy.max_backoff, policy.min_backoff * (2**exponent)))


def expires_at(arrival: float, policy: RetryPolicyConfig) -> float:
    """Epoch seconds after which a message's deferred recipients bounce."""
    return arrival + policy.max_lifetime


def is_expired(now: float, arrival: float, policy: RetryPolicyConfig) -> bool:
    """Whether a message that arrived at `arrival` has outlived maxLifetime at `now`."""
    return now >= expires_at(arrival, policy)


def next_attempt(now: float, arrival: float, attempts: int, policy: RetryPolicyConfig) -> float:
    """When to try again after `attempts` failed attempts: now + backoff, but not after expiry."""
    return max(now, min(now + backoff(attempts, policy), expires_at(arrival, policy)))
