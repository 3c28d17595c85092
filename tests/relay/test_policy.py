"""relay.core.policy: exponential backoff between min and max, lifetime expiry."""

from __future__ import annotations

import pytest

from relay.config import RetryPolicyConfig
from relay.core.policy import backoff, expires_at, is_expired, next_attempt

POLICY = RetryPolicyConfig(min_backoff=300, max_backoff=3600, max_lifetime=5 * 86400)


@pytest.mark.parametrize(
    ("attempts", "seconds"),
    [(0, 300), (1, 300), (2, 600), (3, 1200), (4, 2400), (5, 3600), (6, 3600), (500, 3600)],
)
def test_backoff(attempts: int, seconds: float) -> None:
    assert backoff(attempts, POLICY) == seconds


def test_backoff_equal_min_and_max() -> None:
    flat = RetryPolicyConfig(min_backoff=60, max_backoff=60, max_lifetime=3600)
    assert [backoff(n, flat) for n in range(1, 5)] == [60, 60, 60, 60]


def test_expiry() -> None:
    arrival = 1000.0
    assert expires_at(arrival, POLICY) == arrival + 5 * 86400
    assert not is_expired(arrival + 5 * 86400 - 1, arrival, POLICY)
    assert is_expired(arrival + 5 * 86400, arrival, POLICY)


def test_next_attempt_is_capped_at_expiry() -> None:
    arrival = 0.0
    now = 5 * 86400 - 100.0
    assert next_attempt(now, arrival, 5, POLICY) == 5 * 86400
    assert next_attempt(1000.0, arrival, 1, POLICY) == 1300.0
    assert next_attempt(10 * 86400, arrival, 1, POLICY) == 10 * 86400  # never in the past
