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


def sts(generation: int = 3, **status: Any) -> dict[str, Any]:
    """A StatefulSet as the API returns it: the controller omits counts that are zero."""
    return {"metadata": {"name": "edge", "generation": generation}, "spec": {}, "status": status}


OLD, NEW = "edge-6c9b7d5f4", "edge-8f7e6d5c4"


def rollout(
    *,
    ready: int,
    current: int | None,
    updated: int | None,
    revisions: tuple[str, str],
    available: int,
    replicas: int = 2,
    generation: int = 3,
) -> dict[str, Any]:
    """A StatefulSet (observedGeneration 3) during or after a rollout; a count given as None is
    omitted as the controller omits zeros; ``revisions``: (currentRevision, updateRevision)."""
    counts = {"readyReplicas": ready, "currentReplicas": current, "updatedReplicas": updated}
    return sts(
        generation,
        observedGeneration=3,
        replicas=replicas,
        **{key: value for key, value in counts.items() if value is not None},
        currentRevision=revisions[0],
        updateRevision=revisions[1],
        availableReplicas=available,
    )


@pytest.mark.parametrize(
    ("replicas", "statefulset", "ready", "reason"),
    [
        (2, None, "False", "Progressing"),
        # created, the controller has not written status yet
        (2, {"metadata": {"generation": 1}, "spec": {}}, "False", "Progressing"),
        # the real status at the start of a rollout: zeros omitted (no updatedReplicas at all)
        (
            2,
            rollout(ready=2, current=2, updated=None, revisions=(OLD, NEW), available=2),
            "False",
            "Progressing",
        ),
        # a new spec the controller has not observed yet: its old status says all is well
        (
            2,
            rollout(ready=2, current=2, updated=2, revisions=(OLD, OLD), available=2, generation=4),
            "False",
            "Progressing",
        ),
        # half way: one pod updated
        (
            2,
            rollout(ready=2, current=1, updated=1, revisions=(OLD, NEW), available=2),
            "False",
            "Progressing",
        ),
        # rolled out: the controller moved currentRevision
        (2, rollout(ready=2, current=2, updated=2, revisions=(NEW, NEW), available=2), "True", "Ready"),
        # rolled out but a pod is not ready
        (
            2,
            rollout(ready=1, current=2, updated=2, revisions=(NEW, NEW), available=1),
            "False",
            "Progressing",
        ),
        # no revisions reported: every replica must be counted as updated
        (2, sts(observedGeneration=3, replicas=2, readyReplicas=2), "False", "Progressing"),
        (2, sts(observedGeneration=3, replicas=2, readyReplicas=2, updatedReplicas=2), "True", "Ready"),
        (0, sts(observedGeneration=3, replicas=0, availableReplicas=0), "True", "ScaledToZero"),
        (0, sts(observedGeneration=3, replicas=1, availableReplicas=1), "False", "Progressing"),
    ],
)
def test_ready_follows_the_statefulset_rollout(
    replicas: int, statefulset: dict[str, Any] | None, ready: str, reason: str
) -> None:
    relay_plan = _plan(replicas=replicas).relays["edge"]
    status = mailrelay_status(relay_plan, previous=None, statefulset=statefulset, now=T0)
    found = _by_type(status)
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == (ready, reason)
    assert found["ConfigValid"]["status"] == "True"
    assert (found["Applied"]["status"], found["Applied"]["reason"]) == ("True", "Applied")
    assert status["observedGeneration"] == 7
    assert status["selector"] == "app.kubernetes.io/instance=edge,app.kubernetes.io/name=mailrelay"
    assert status["replicas"] == ((statefulset or {}).get("status") or {}).get("replicas", 0)


ROLLED_OUT = rollout(ready=1, current=None, updated=1, revisions=(NEW, NEW), available=1, replicas=1)
SUBJECT = topology.ObjectRef("MailRelay", "mail", "edge")


def test_applied_reports_refusals_and_what_cannot_be_applied() -> None:
    relay_plan = _plan().relays["edge"]
    refused = Problem(
        SUBJECT, "ApiRejected", "Service edge: the API server refused the write: 422 Invalid: x"
    )
    shrink = Problem(SUBJECT, "StorageShrink", "cannot shrink: 2Gi live, 1Gi wanted")
    status = mailrelay_status(
        relay_plan, previous=None, statefulset=ROLLED_OUT, now=T0, apply_problems=[shrink, refused]
    )
    found = _by_type(status)
    assert (found["Applied"]["status"], found["Applied"]["reason"]) == ("False", "ApiRejected")
    assert "422 Invalid: x" in found["Applied"]["message"] and "2Gi live" in found["Applied"]["message"]
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "NotApplied")
    assert found["ConfigValid"]["status"] == "True"  # the configuration itself is fine
    # Work in progress (a warning) is not a failure: Ready says Progressing.
    recreating = Problem(SUBJECT, "Recreating", "StatefulSet edge is recreated", severity="warning")
    status = mailrelay_status(
        relay_plan, previous=status, statefulset=None, now=T1, apply_problems=[recreating]
    )
    found = _by_type(status)
    assert (found["Applied"]["status"], found["Applied"]["reason"]) == ("False", "Recreating")
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "Progressing")
    assert found["Applied"]["lastTransitionTime"] == conditions.timestamp(T0)  # still False


def test_status_lists_routes_and_config_hash() -> None:
    route = crd_tools.route_body(priority=3)
    relay_plan = _plan([route]).relays["edge"]
    status = mailrelay_status(relay_plan, previous=None, statefulset=None, now=T0)
    assert status["routeCount"] == 1
    assert status["routes"] == [{"name": "r", "priority": 3, "nextHop": "mx:25"}]
    assert status["configHash"] == relay_plan.config_hash


def test_loop_and_missing_secret_make_config_invalid() -> None:
    loop = crd_tools.route_body(nextHop={"relay": {"name": "edge"}})
    relay_plan = _plan([loop]).relays["edge"]
    previous = mailrelay_status(_plan().relays["edge"], previous=None, statefulset=ROLLED_OUT, now=T0)
    status = mailrelay_status(relay_plan, previous=previous, statefulset=ROLLED_OUT, now=T1)
    found = _by_type(status)
    assert (found["ConfigValid"]["status"], found["ConfigValid"]["reason"]) == ("False", "RoutingLoop")
    assert "edge -> edge" in found["ConfigValid"]["message"]
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "ConfigInvalid")
    assert found["ConfigValid"]["lastTransitionTime"] == conditions.timestamp(T1)
    missing = Problem(
        topology.ObjectRef("MailRelay", "mail", "edge"), "SecretMissing", "Secret x does not exist"
    )
    status = mailrelay_status(
        _plan().relays["edge"], previous=status, statefulset=None, now=T1, extra_problems=[missing]
    )
    assert (_by_type(status)["ConfigValid"]["reason"]) == "SecretMissing"


def test_invalid_relay_status() -> None:
    body = crd_tools.relay_body(listeners=[])
    invalid = topology.plan_namespace("mail", [body], []).invalid_relays["edge"]
    status = mailrelay_status(invalid, previous=None, statefulset=None, now=T0)
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


@pytest.mark.parametrize(
    ("spec", "safe", "reason"),
    [
        ({}, "True", "NoOpenRelay"),  # the defaults
        ({"acceptDomains": ["example.com"], "trustedNetworks": ["10.0.0.0/8"]}, "True", "NoOpenRelay"),
        ({"trustedNetworks": ["0.0.0.0/0"]}, "False", "OpenRelay"),  # deliberately open
        ({"trustedNetworks": ["192.0.2.0/24"]}, "False", "OpenRelay"),  # trusts outsiders
    ],
)
def test_relay_safe_condition(spec: dict[str, Any], safe: str, reason: str) -> None:
    """RelaySafe: the open-relay probe set judged by the relay's own RCPT rule against the
    rendered config, for a client outside the cluster (a catch-all MX route: anything routable)."""
    route = crd_tools.route_body(nextHop={"mx": {}})
    relay_plan = _plan([route], **spec).relays["edge"]
    found = _by_type(mailrelay_status(relay_plan, previous=None, statefulset=None, now=T0))
    assert (found["RelaySafe"]["status"], found["RelaySafe"]["reason"]) == (safe, reason)
    if safe == "False":
        assert "(plain, null-sender," in found["RelaySafe"]["message"]


def test_relay_safe_follows_the_pods_self_checks() -> None:
    """A pod whose own self-check relayed a probe (its /queue relaySafe false) makes RelaySafe
    False even when the configuration looks safe; pods that passed are named."""
    from relay_operator.queues import QueueReport

    relay_plan = _plan([crd_tools.route_body(nextHop={"mx": {}})]).relays["edge"]
    bodies = {"edge-0": {"pod": "edge-0", "relaySafe": True}, "edge-1": {"pod": "edge-1", "relaySafe": False}}
    reports = [QueueReport.parse(pod, body) for pod, body in bodies.items()]
    assert all(r.ok for r in reports) and [r.relay_safe for r in reports] == [True, False]
    found = _by_type(
        mailrelay_status(relay_plan, previous=None, statefulset=None, now=T0, self_checks=reports)
    )
    assert (found["RelaySafe"]["status"], found["RelaySafe"]["reason"]) == ("False", "OpenRelay")
    assert "edge-1" in found["RelaySafe"]["message"]
    found = _by_type(
        mailrelay_status(relay_plan, previous=None, statefulset=None, now=T0, self_checks=reports[:1])
    )
    assert found["RelaySafe"]["status"] == "True" and "self-check of edge-0" in found["RelaySafe"]["message"]
    assert not QueueReport.parse("edge-0", {"pod": "edge-0", "relaySafe": "yes"}).ok
    assert QueueReport.parse("edge-0", {"pod": "edge-0", "relaySafe": None}).relay_safe is None
