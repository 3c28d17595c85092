"""relay_operator.reconcile's pure parts: how a live object is compared with the desired one."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from relay_operator.reconcile import contains, quantity_value


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("500m", Decimal("0.5")),
        ("0.5", Decimal("0.5")),
        ("1Gi", Decimal(2**30)),
        ("1024Mi", Decimal(2**30)),
        (1073741824, Decimal(2**30)),
        ("1e3", Decimal(1000)),
        ("1k", Decimal(1000)),
        ("+.5", Decimal("0.5")),
        ("100n", Decimal("1e-7")),
        ("5 Mi", None),
        ("1KiB", None),
        (True, None),
        (None, None),
    ],
)
def test_quantity_value(text: Any, amount: Decimal | None) -> None:
    assert quantity_value(text) == amount


@pytest.mark.parametrize(
    ("live", "desired", "expected"),
    [
        ({"a": 1, "server": "x"}, {"a": 1}, True),  # what the server adds is not drift
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"l": [1, 2]}, {"l": [1]}, False),
        ({"resources": {"requests": {"cpu": "500m"}}}, {"resources": {"requests": {"cpu": "0.5"}}}, True),
        (
            {"resources": {"limits": {"memory": "1Gi"}}},
            {"resources": {"limits": {"memory": "1073741824"}}},
            True,
        ),
        ({"resources": {"limits": {"memory": "1Gi"}}}, {"resources": {"limits": {"memory": "1G"}}}, False),
        (
            {"c": [{"resources": {"requests": {"cpu": "1"}}}]},
            {"c": [{"resources": {"requests": {"cpu": 1}}}]},
            True,
        ),
        ({"data": {"size": "1Gi"}}, {"data": {"size": "1024Mi"}}, False),  # only quantity maps
        ({"requests": {"cpu": "abc"}}, {"requests": {"cpu": "abc"}}, True),
        ({"requests": {"cpu": "1"}}, {"requests": {"cpu": "abc"}}, False),
    ],
)
def test_contains(live: Any, desired: Any, expected: bool) -> None:
    assert contains(live, desired) is expected


def test_pod_queues_are_asked_at_the_same_time_and_reported_in_order() -> None:
    import threading

    from relay_operator import reconcile
    from relay_operator.queues import QueueReport

    pods = [{"metadata": {"name": f"edge-{i}"}, "status": {"podIP": f"127.244.0.{i + 1}"}} for i in range(3)]
    pods.append({"metadata": {"name": "edge-3"}, "status": {}})  # not started yet
    # Each probe waits for the other two: asked one after another, the barrier would break.
    together = threading.Barrier(3, timeout=30)
    asked: list[tuple[str, str, int]] = []

    def probe(pod: str, ip: str, port: int) -> QueueReport:
        asked.append((pod, ip, port))
        together.wait()
        return QueueReport(pod=pod, depth=int(pod[-1]))

    reports = reconcile._probe_pods(pods, probe, 9090)
    assert [r.pod for r in reports] == ["edge-0", "edge-1", "edge-2", "edge-3"]
    assert [r.depth for r in reports[:3]] == [0, 1, 2]
    assert reports[3].error == "the pod has no IP yet"
    assert sorted(asked) == [
        ("edge-0", "127.244.0.1", 9090),
        ("edge-1", "127.244.0.2", 9090),
        ("edge-2", "127.244.0.3", 9090),
    ]
    assert [r.error for r in reconcile._probe_pods(pods[:1], None, 9090)] == [
        "the operator does not read pod queues"
    ]
