"""relay.core.abuse: what the shared per-client counts mean (tables)."""

from __future__ import annotations

from relay.config import AbuseConfig, LimitsConfig
from relay.core import status
from relay.core.abuse import (
    Window,
    advance,
    block_after_failure,
    connection_refusal,
    is_blocked,
    message_refusal,
)

LIMITS = LimitsConfig(max_connections_per_client=3)
ABUSE = AbuseConfig(window=60, auth_failures=3, block_for=100, connections=5, messages=2)


def test_rules() -> None:
    # Fixed windows: a new window after `length`, or when the clock went back.
    assert advance(None, 10.0, 60) == Window(10.0, 1)
    assert advance(Window(10.0, 4), 69.9, 60) == Window(10.0, 5)
    assert advance(Window(10.0, 4), 70.0, 60) == Window(70.0, 1)
    assert advance(Window(10.0, 4), 5.0, 60) == Window(5.0, 1)
    # Blocks.
    assert block_after_failure(Window(0, 2), 50.0, ABUSE) is None
    assert block_after_failure(Window(0, 3), 50.0, ABUSE) == 150.0
    assert block_after_failure(Window(0, 99), 50.0, AbuseConfig(auth_failures=0)) is None  # off
    assert is_blocked(150.0, 149.9) and not is_blocked(150.0, 150.0) and not is_blocked(None, 0)

    def refusal(**kw: object) -> str | None:
        args: dict[str, object] = {
            "blocked_until": None,
            "live": 1,
            "recent": Window(0, 1),
            "trusted": False,
            "now": 10.0,
            "limits": LIMITS,
            "abuse": ABUSE,
        }
        args.update(kw)
        result = connection_refusal(**args)  # type: ignore[arg-type]
        return None if result is None else result[1]

    assert refusal() is None
    assert refusal(blocked_until=11.0) == "blocked"
    assert refusal(blocked_until=11.0, trusted=True) == "blocked"  # trusted is no exemption
    assert refusal(blocked_until=9.0) is None
    assert refusal(live=3) is None and refusal(live=4) == "connections"
    assert refusal(live=4, trusted=True) == "connections"
    assert refusal(recent=Window(0, 6)) == "connection_rate"
    assert refusal(recent=Window(0, 6), trusted=True) is None
    assert refusal(recent=Window(0, 600), abuse=AbuseConfig(connections=0)) is None
    assert connection_refusal(
        blocked_until=20.0, live=1, recent=None, trusted=False, now=10.0, limits=LIMITS, abuse=ABUSE
    ) == (status.CLIENT_BLOCKED, "blocked")
    # Messages.
    assert message_refusal(recent=Window(0, 2), trusted=False, abuse=ABUSE) is None
    assert message_refusal(recent=Window(0, 3), trusted=False, abuse=ABUSE) == (
        status.TOO_MUCH_MAIL,
        "messages",
    )
    assert message_refusal(recent=Window(0, 3), trusted=True, abuse=ABUSE) is None
