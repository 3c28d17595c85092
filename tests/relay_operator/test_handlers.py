"""relay_operator.handlers' pure parts: when the resync loop may act under kopf peering, and what
the server's version changes in the build options."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from relay_operator import builders
from relay_operator.handlers import peering_allows

NOW = datetime(2026, 12, 3, 10, 0, 0, tzinfo=UTC)


def peer(priority: int, seconds_ago: float = 1, lifetime: int = 60) -> dict[str, Any]:
    return {
        "priority": priority,
        "lifetime": lifetime,
        "lastseen": (NOW - timedelta(seconds=seconds_ago)).isoformat(),
    }


@pytest.mark.parametrize(
    ("status", "allowed"),
    [
        ({}, True),  # alone
        ({"me": peer(5)}, True),  # only itself
        ({"me": peer(5), "other": peer(1)}, True),  # a lower priority peer pauses, not this one
        ({"me": peer(5), "other": peer(9)}, False),  # a higher one is alive
        ({"me": peer(5), "other": peer(5)}, False),  # the same priority: kopf pauses both
        ({"me": peer(5), "other": peer(9, seconds_ago=61)}, True),  # that peer's lifetime is over
        ({"me": peer(5), "other": {"priority": 9}}, False),  # no lastseen: kopf takes it as now
        ({"me": peer(5), "other": {"priority": "high", "lastseen": "x"}}, False),  # unreadable
    ],
)
def test_peering_allows_mirrors_kopfs_rule(status: dict[str, Any], allowed: bool) -> None:
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "status": status}
    assert peering_allows(body, identity="me", priority=5, now=NOW) is allowed


def test_a_missing_peering_object_pauses() -> None:
    assert peering_allows(None, identity="me", priority=0, now=NOW) is False


@pytest.mark.parametrize(
    ("version", "retention"),
    [((1, 25), False), ((1, 26), False), ((1, 27), True), ((1, 34), True), (None, True)],
)
def test_the_claim_retention_policy_is_sent_where_the_server_keeps_it(
    version: tuple[int, int] | None, retention: bool
) -> None:
    assert builders.for_server(builders.BuildOptions(), version).pvc_retention_policy is retention
