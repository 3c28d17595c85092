"""relay_operator.conditions: metav1.Condition semantics and the status bodies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from relay_operator import conditions, topology
from relay_operator.conditions import mailrelay_status, relayroute_status, set_condition
from relay_operator.topology import Problem
from tests.relay_operator import crd_tools

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_new_condition_gets_the_time_and_generation() -> None:
    (entry,) = set_condition([], "Ready", True, "Ready", "ok", observed_generation=4, now=T0)
    assert entry == {
        "type": "Ready",
        "status": "True",
        "reason": "Ready",
        "message": "ok",
        "lastTransitionTime": "2026-01-02T03:04:05Z",
        "observedGeneration": 4,
    }


def test_transition_time_changes_only_on_a_flip() -> None:
    first = set_condition([], "Ready", False, "Progressing", "0/2", observed_generation=1, now=T0)
    same = set_condition(first, "Ready", False, "Progressing", "1/2", observed_generation=2, now=T1)
    assert same[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert (same[0]["message"], same[0]["observedGeneration"]) == ("1/2", 2)
    flipped = set_condition(same, "Ready", True, "Ready", "2/2", observed_generation=2, now=T1)
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert first[0]["status"] == "False"  # the input is not changed


def test_other_conditions_keep_their_place() -> None:
    both = set_condition([], "ConfigValid", True, "Valid", "", observed_generation=1, now=T0)
    both = set_condition(both, "Ready", True, "Ready", "", observed_generation=1, now=T0)
    updated = set_condition(both, "ConfigValid", False, "RoutingLoop", "x", observed_generation=2, now=T1)
    assert [c["type"] for c in updated] == ["ConfigValid", "Ready"]
    assert updated[1] == both[1]
    with pytest.raises(ValueError):
        set_condition([], "Ready", "Maybe", "X", "", observed_generation=None, now=T0)


def _plan(routes: list[dict[str, Any]] | None = None, **spec: Any) -> topology.NamespacePlan:
    body = crd_tools.relay_body(routeSelector={"matchLabels": {"relay": "edge"}}, **spec)
    body["metadata"]["generation"] = 7
    return topology.plan_namespace("mail", [body], routes or [])


def _by_type(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


@pytest.mark.parametrize(
    ("replicas", "sts", "ready", "reason"),
    [
        (2, None, "False", "Progressing"),
        (2, {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}, "False", "Progressing"),
        (2, {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}, "True", "Ready"),
        (2, {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 1}, "False", "Progressing"),
        (0, {"replicas": 0}, "True", "ScaledToZero"),
    ],
)
def test_ready_follows_the_statefulset(
    replicas: int, sts: dict[str, Any] | None, ready: str, reason: str
) -> None:
    relay_plan = _plan(replicas=replicas).relays["edge"]
    status = mailrelay_status(relay_plan, previous=None, statefulset_status=sts, now=T0)
    found = _by_type(status)
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == (ready, reason)
    assert found["ConfigValid"]["status"] == "True"
    assert status["observedGeneration"] == 7
    assert status["selector"] == "app.kubernetes.io/instance=edge,app.kubernetes.io/name=mailrelay"
    assert status["replicas"] == (sts or {}).get("replicas", 0)


def test_status_lists_routes_and_config_hash() -> None:
    route = crd_tools.route_body(priority=3)
    relay_plan = _plan([route]).relays["edge"]
    status = mailrelay_status(relay_plan, previous=None, statefulset_status=None, now=T0)
    assert status["routeCount"] == 1
    assert status["routes"] == [{"name": "r", "priority": 3, "nextHop": "mx:25"}]
    assert status["configHash"] == relay_plan.config_hash


def test_loop_and_missing_secret_make_config_invalid() -> None:
    loop = crd_tools.route_body(nextHop={"relay": {"name": "edge"}})
    relay_plan = _plan([loop]).relays["edge"]
    previous = mailrelay_status(
        _plan().relays["edge"], previous=None, statefulset_status={"replicas": 1, "readyReplicas": 1}, now=T0
    )
    status = mailrelay_status(
        relay_plan, previous=previous, statefulset_status={"replicas": 1, "readyReplicas": 1}, now=T1
    )
    found = _by_type(status)
    assert (found["ConfigValid"]["status"], found["ConfigValid"]["reason"]) == ("False", "RoutingLoop")
    assert "edge -> edge" in found["ConfigValid"]["message"]
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "ConfigInvalid")
    assert found["ConfigValid"]["lastTransitionTime"] == conditions.timestamp(T1)
    missing = Problem(
        topology.ObjectRef("MailRelay", "mail", "edge"), "SecretMissing", "Secret x does not exist"
    )
    status = mailrelay_status(
        _plan().relays["edge"], previous=status, statefulset_status=None, now=T1, extra_problems=[missing]
    )
    assert (_by_type(status)["ConfigValid"]["reason"]) == "SecretMissing"


def test_invalid_relay_status() -> None:
    body = crd_tools.relay_body(listeners=[])
    invalid = topology.plan_namespace("mail", [body], []).invalid_relays["edge"]
    status = mailrelay_status(invalid, previous=None, statefulset_status=None, now=T0)
    found = _by_type(status)
    assert (found["ConfigValid"]["status"], found["ConfigValid"]["reason"]) == ("False", "InvalidSpec")
    assert "spec.listeners" in found["ConfigValid"]["message"]
    assert "routes" not in status


def _route_status(routes: list[dict[str, Any]], name: str, relays: int = 1) -> dict[str, dict[str, Any]]:
    bodies = [crd_tools.relay_body(routeSelector={"matchLabels": {"relay": "edge"}})][:relays]
    result = topology.plan_namespace("mail", bodies, routes)
    status = relayroute_status(result.routes[name], previous=None, now=T0)
    return {**_by_type(status), "_status": status}


def _named(name: str, **spec: Any) -> dict[str, Any]:
    body = crd_tools.route_body(**spec)
    body["metadata"]["name"] = name
    body["metadata"]["generation"] = 2
    return body


def test_route_accepted_resolved_not_conflicted() -> None:
    found = _route_status([_named("r")], "r")
    assert [(found[t]["status"], found[t]["reason"]) for t in ("Accepted", "Resolved", "Conflicted")] == [
        ("True", "Accepted"),
        ("True", "Resolved"),
        ("False", "NoConflict"),
    ]
    assert found["_status"]["nextHop"] == "mx:25"
    assert found["_status"]["relays"] == ["edge"]
    assert found["_status"]["observedGeneration"] == 2


def test_route_problems_as_conditions() -> None:
    assert _route_status([_named("r")], "r", relays=0)["Accepted"]["reason"] == "NotSelected"
    unknown = _route_status([_named("r", nextHop={"relay": {"name": "ghost"}})], "r")
    assert (unknown["Resolved"]["status"], unknown["Resolved"]["reason"]) == ("False", "UnknownRelay")
    invalid = _route_status([_named("r", nextHop={})], "r")
    assert (invalid["Accepted"]["status"], invalid["Accepted"]["reason"]) == ("False", "InvalidSpec")
    assert invalid["Resolved"]["status"] == "Unknown"
    conflict = _route_status([_named("r"), _named("s")], "r")
    assert (conflict["Conflicted"]["status"], conflict["Conflicted"]["reason"]) == ("True", "Conflict")
