"""relay_operator.scaledown.decide: the two-phase scale-down as a table of situations (pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from relay_operator import naming, scaledown
from relay_operator.queues import QueueReport
from relay_operator.scaledown import Claim, Inputs

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
PEER0 = ("edge-0.edge-headless.mail.svc.cluster.local", naming.HANDOFF_PORT)


def claims(*ordinals: int) -> list[Claim]:
    return [Claim(f"spool-edge-{o}", f"uid-{o}", o) for o in ordinals]


def report(pod: str, depth: int = 0, *, draining: bool = True) -> QueueReport:
    return QueueReport(pod=pod, depth=depth, draining=draining, drained=draining and depth == 0)


def inputs(**changes: Any) -> Inputs:
    base = Inputs(
        relay="edge",
        namespace="mail",
        desired=1,
        live_replicas=3,
        pods=frozenset({0, 1, 2}),
        reports={},
        claims=claims(0, 1, 2),
        jobs={},
        previous=None,
        drain_timeout="1h",
        removed_claims="Delete",
        now=NOW,
    )
    return replace(base, **changes)


def started(minutes_ago: float, **extra: Any) -> dict[str, Any]:
    at = (NOW - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"from": 3, "to": 1, "startedAt": at, "pods": ["edge-1", "edge-2"], **extra}


def test_no_scale_down_changes_nothing() -> None:
    decision = scaledown.decide(inputs(desired=3))
    assert decision.drain is None and decision.status is None and not decision.busy
    assert decision.condition == (False, "NoScaleDown", "no scale-down in progress")
    assert decision.delete_claims == decision.start_jobs == () and decision.events == ()


def test_lower_replicas_drains_the_highest_ordinals_and_keeps_the_size() -> None:
    reports = {"edge-1": report("edge-1", 4), "edge-2": report("edge-2", 0, draining=False)}
    decision = scaledown.decide(inputs(reports=reports))
    assert decision.drain is not None
    assert decision.drain.replicas == 3  # the StatefulSet keeps its size meanwhile
    assert decision.drain.pods == ("edge-1", "edge-2")
    assert decision.drain.peers == (PEER0,)
    status, reason, message = decision.condition
    assert (status, reason) == (True, "Draining")
    assert "edge-1: 4 queued, draining" in message and "edge-2: 0 queued, not draining yet" in message
    assert [e.reason for e in decision.events] == ["Draining"]
    assert decision.status is not None and decision.status["startedAt"] == "2026-12-03T12:00:00Z"
    assert decision.busy and decision.delete_claims == () and decision.start_jobs == ()
    # The next pass keeps the start time and posts no second Draining Event.
    again = scaledown.decide(
        inputs(reports=reports, previous={**decision.status}, now=NOW + timedelta(minutes=5))
    )
    assert again.status is not None and again.status["startedAt"] == "2026-12-03T12:00:00Z"
    assert again.events == ()


def test_a_pod_that_does_not_answer_is_not_drained() -> None:
    reports = {"edge-1": report("edge-1"), "edge-2": QueueReport.failed("edge-2", "connection refused")}
    decision = scaledown.decide(inputs(reports=reports, previous=started(1)))
    assert decision.drain is not None and decision.drain.replicas == 3
    assert "edge-2: connection refused" in decision.condition[2]
    missing = scaledown.decide(inputs(reports={"edge-1": report("edge-1")}, previous=started(1)))
    assert missing.drain is not None and missing.drain.replicas == 3


def test_once_every_draining_pod_is_empty_the_statefulset_shrinks_and_the_claims_are_recorded() -> None:
    reports = {"edge-1": report("edge-1"), "edge-2": report("edge-2")}
    decision = scaledown.decide(inputs(reports=reports, previous=started(2)))
    assert decision.drain is not None and decision.drain.replicas == 1
    assert decision.drain.pods == ("edge-1", "edge-2")  # still draining until they are gone
    assert decision.condition[1] == "Drained"
    assert [e.reason for e in decision.events] == ["Drained"]
    assert decision.status is not None
    assert decision.status["emptyClaims"] == [
        {"name": "spool-edge-1", "uid": "uid-1"},
        {"name": "spool-edge-2", "uid": "uid-2"},
    ]
    assert decision.delete_claims == ()  # not while the pods still use them
    # Pods still there but the StatefulSet is at 1: they are being removed.
    removing = scaledown.decide(inputs(live_replicas=1, reports=reports, previous=decision.status))
    assert removing.condition[1] == "Removing" and removing.drain is not None
    assert removing.drain.replicas == 1 and removing.delete_claims == ()
    # Gone: the verified claims are deleted, no drain section any more.
    gone = scaledown.decide(inputs(live_replicas=1, pods=frozenset({0}), previous=removing.status))
    assert gone.drain is None
    assert [c.name for c in gone.delete_claims] == ["spool-edge-1", "spool-edge-2"]
    assert gone.start_jobs == ()


def test_retain_keeps_verified_claims() -> None:
    previous = {"emptyClaims": [{"name": "spool-edge-1", "uid": "uid-1"}]}
    decision = scaledown.decide(
        inputs(
            live_replicas=1,
            pods=frozenset({0}),
            claims=claims(0, 1),
            previous=previous,
            removed_claims="Retain",
        )
    )
    assert decision.delete_claims == () and decision.start_jobs == ()
    assert decision.status is not None and decision.status["emptyClaims"] == previous["emptyClaims"]


def test_a_claim_used_again_is_no_longer_verified_empty() -> None:
    previous = {"emptyClaims": [{"name": "spool-edge-1", "uid": "uid-1"}]}
    decision = scaledown.decide(
        inputs(desired=2, live_replicas=2, pods=frozenset({0, 1}), claims=claims(0, 1), previous=previous)
    )
    assert decision.status is None and decision.delete_claims == ()


def test_a_recreated_claim_of_the_same_name_is_not_the_verified_one() -> None:
    previous = {"emptyClaims": [{"name": "spool-edge-1", "uid": "uid-old"}]}
    decision = scaledown.decide(
        inputs(live_replicas=1, pods=frozenset({0}), claims=claims(0, 1), previous=previous)
    )
    assert decision.delete_claims == ()
    assert [c.uid for c in decision.start_jobs] == ["uid-1"]  # it may hold mail: drained by a Job
    assert decision.job_target == PEER0


def test_the_drain_timeout_gives_up_and_keeps_the_claims() -> None:
    reports = {"edge-1": report("edge-1", 3), "edge-2": report("edge-2")}
    decision = scaledown.decide(inputs(reports=reports, previous=started(61)))
    assert decision.drain is not None and decision.drain.replicas == 1
    assert decision.condition[1] == "DrainTimedOut"
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "DrainTimedOut")]
    assert decision.status is not None and "emptyClaims" not in decision.status
    # Once the pods are gone their claims may hold mail: a drain Job each.
    gone = scaledown.decide(inputs(live_replicas=1, pods=frozenset({0}), previous=decision.status))
    assert [c.name for c in gone.start_jobs] == ["spool-edge-1", "spool-edge-2"]
    assert gone.delete_claims == () and gone.condition[1] == "DrainingClaims" and gone.busy


def test_drain_jobs_decide_the_claims() -> None:
    base = inputs(live_replicas=1, pods=frozenset({0}), previous={"reason": "DrainingClaims"})
    running = scaledown.decide(replace(base, jobs={"uid-1": "running", "uid-2": "running"}))
    assert running.start_jobs == () and running.delete_claims == ()
    assert running.condition[1] == "DrainingClaims" and running.events == ()
    done = scaledown.decide(replace(base, jobs={"uid-1": "succeeded", "uid-2": "failed"}))
    assert [c.name for c in done.delete_claims] == ["spool-edge-1"]
    assert done.condition[:2] == (False, "MailKept") and "spool-edge-2" in done.condition[2]
    assert {e.reason for e in done.events} == {"ClaimDrained", "MailKept"}
    assert done.problems == ("the drain Job of spool-edge-2 failed",)


def test_scaling_to_zero_has_no_peer_says_so_and_keeps_the_claims() -> None:
    reports = {f"edge-{o}": report(f"edge-{o}", 2) for o in range(3)}
    decision = scaledown.decide(inputs(desired=0, reports=reports))
    assert decision.drain is not None and decision.drain.peers == () and decision.drain.replicas == 3
    assert decision.drain.pods == ("edge-0", "edge-1", "edge-2")
    assert decision.condition[:2] == (True, "NoPeer") and "no pod remains" in decision.condition[2]
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "NoPeer")]
    assert decision.job_target is None
    again = scaledown.decide(inputs(desired=0, reports=reports, previous=decision.status))
    assert again.events == ()  # one Event, not one per pass
    timed_out = scaledown.decide(
        inputs(desired=0, reports=reports, previous={**started(61), "pods": ["edge-0"]})
    )
    assert timed_out.drain is not None and timed_out.drain.replicas == 0
    gone = scaledown.decide(inputs(desired=0, live_replicas=0, pods=frozenset(), previous=timed_out.status))
    assert gone.start_jobs == () and gone.delete_claims == ()
    assert gone.condition[:2] == (False, "MailKept") and "replicas: 0" in gone.condition[2]
    # Pods that empty their queue can go even with nobody to take mail.
    empty = {f"edge-{o}": report(f"edge-{o}") for o in range(3)}
    drained = scaledown.decide(inputs(desired=0, reports=empty, previous=started(1)))
    assert drained.drain is not None and drained.drain.replicas == 0 and drained.condition[1] == "Drained"


def test_scaling_up_while_draining_stops_the_drain_of_the_pods_that_stay() -> None:
    reports = {"edge-1": report("edge-1", 3), "edge-2": report("edge-2", 1)}
    decision = scaledown.decide(inputs(desired=2, reports=reports, previous=started(1)))
    assert decision.drain is not None and decision.drain.pods == ("edge-2",)
    assert decision.drain.peers == (
        PEER0,
        ("edge-1.edge-headless.mail.svc.cluster.local", naming.HANDOFF_PORT),
    )
    back = scaledown.decide(inputs(desired=3, reports=reports, previous=decision.status))
    assert back.drain is None and back.condition[1] == "NoScaleDown"


def test_a_report_from_another_pod_is_refused() -> None:
    assert not QueueReport.parse("edge-1", {"pod": "edge-7", "depth": 0, "drained": True}).ok
    assert QueueReport.parse(
        "edge-1", {"pod": "edge-1", "depth": 0, "draining": True, "drained": True}
    ).drained
    assert not QueueReport.parse("edge-1", {"depth": -1}).ok
    assert not QueueReport.parse("edge-1", {"depth": 1, "drained": "yes"}).ok
    assert not QueueReport.parse("edge-1", [1]).ok
    # drained with a depth is not drained.
    assert not QueueReport.parse("edge-1", {"depth": 2, "draining": True, "drained": True}).drained
