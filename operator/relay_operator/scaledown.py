"""Safe, queue-aware scale-down of one MailRelay (issue 14): what the StatefulSet, the relay
config, the spool claims and the `Draining` condition should be, from what the cluster and the
pods report now.

A lower ``spec.replicas`` is two-phase. The pods that go are the highest ordinals (the
StatefulSet controller removes those). First they drain: the relay config names them in
``drain.pods`` with the remaining pods as ``drain.peers`` (their per-pod DNS names through the
headless Service, hand-off port), and the StatefulSet keeps its size. Each draining pod stops
taking mail, delivers what it can and hands the rest to a peer; once every draining pod's
``GET /queue`` says ``drained``, the StatefulSet is lowered and their spool claims are recorded
as verified empty (in ``status.scaleDown.emptyClaims``, by uid). When that does not happen
within ``spec.scaleDown.drainTimeout`` (no peer left with ``replicas: 0``, a peer that refuses),
the operator gives up: the StatefulSet is lowered and the claims are kept with their mail.

Claims of removed ordinals (no pod, ordinal at or above the StatefulSet's size):
- verified empty: deleted (``removedClaims: Delete``) or kept (``Retain``);
- anything else may hold mail (a forced scale-down, a timeout, a crash, an older operator): a
  Job mounts it and runs ``mailrelay drain`` to pod 0's hand-off port; once that Job succeeded
  (it exits 0 only when the spool is empty) the claim counts as verified empty. With no pod left
  to take the mail (``replicas: 0``), the claim is kept and the condition says so.
A claim is deleted only by uid (a claim recreated under the same name is another claim), and
only when the uid was verified empty while no pod used it.

`decide` is pure: the reconcile path gathers the inputs (live StatefulSet size, pods, their
reports, claims, Jobs, the previous ``status.scaleDown``), applies the result and posts the
Events. No I/O, no Kubernetes client, the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from relay.config import parse_duration
from relay_operator import naming
from relay_operator.builders import Drain
from relay_operator.conditions import timestamp
from relay_operator.queues import QueueReport

JobState = Literal["running", "succeeded", "failed"]


@dataclass(frozen=True)
class Claim:
    name: str
    uid: str
    ordinal: int
    deleting: bool = False


@dataclass(frozen=True)
class Inputs:
    """What the reconcile path read for one relay."""

    relay: str
    namespace: str
    desired: int  # spec.replicas
    live_replicas: int | None  # the StatefulSet's spec.replicas; None when it does not exist
    pods: frozenset[int]  # ordinals of the relay's pods that exist (not being deleted)
    reports: Mapping[str, QueueReport]  # by pod name
    claims: Sequence[Claim]
    jobs: Mapping[str, JobState]  # drain Job state by claim uid
    previous: Mapping[str, Any] | None  # status.scaleDown of the last pass
    drain_timeout: str
    removed_claims: Literal["Delete", "Retain"]
    now: datetime
    cluster_domain: str = "cluster.local"


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    drain: Drain | None  # for the builders; None: spec.replicas, no drain section
    condition: tuple[bool, str, str]  # Draining: status, reason, message
    status: dict[str, Any] | None  # status.scaleDown (None: nothing in progress)
    delete_claims: tuple[Claim, ...] = ()
    start_jobs: tuple[Claim, ...] = ()  # claims that need a drain Job (none exists for their uid)
    job_target: tuple[str, int] | None = None  # where a drain Job hands the mail
    events: tuple[Event, ...] = ()
    busy: bool = False  # something will change soon: poll again shortly
    problems: tuple[str, ...] = field(default=())


def _started(previous: Mapping[str, Any] | None, now: datetime) -> datetime:
    raw = (previous or {}).get("startedAt")
    if isinstance(raw, str) and (previous or {}).get("pods"):
        try:
            return datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            pass
    return now


def _empty_claims(previous: Mapping[str, Any] | None) -> dict[str, str]:
    """uid → name of the claims verified empty on earlier passes."""
    found: dict[str, str] = {}
    for entry in (previous or {}).get("emptyClaims") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("uid"), str):
            found[entry["uid"]] = str(entry.get("name") or "")
    return found


def _progress(names: Sequence[str], reports: Mapping[str, QueueReport]) -> str:
    parts = []
    for name in names:
        report = reports.get(name)
        if report is None:
            parts.append(f"{name}: no pod")
        elif not report.ok:
            parts.append(f"{name}: {report.error}")
        elif report.drained:
            parts.append(f"{name}: empty")
        else:
            state = "draining" if report.draining else "not draining yet"
            parts.append(f"{name}: {report.depth} queued, {state}")
    return "; ".join(parts)


def decide(inputs: Inputs) -> Decision:
    """The scale-down step for this pass (see the module docstring)."""
    relay, desired, now = inputs.relay, inputs.desired, inputs.now
    live = inputs.live_replicas if inputs.live_replicas is not None else desired
    top = max([live, *(ordinal + 1 for ordinal in inputs.pods)])
    draining = [o for o in range(desired, top) if o < live or o in inputs.pods]
    names = [naming.pod_name(relay, o) for o in draining]
    peers = tuple(
        (naming.pod_dns_name(relay, o, inputs.namespace, inputs.cluster_domain), naming.HANDOFF_PORT)
        for o in range(desired)
    )
    previous = inputs.previous or {}
    previous_reason = str(previous.get("reason") or "")
    empty = _empty_claims(previous)
    claims_by_ordinal = {c.ordinal: c for c in inputs.claims if not c.deleting}
    # A claim that a pod will use again (ordinal below the StatefulSet's size) can get mail again.
    events: list[Event] = []
    problems: list[str] = []
    status: dict[str, Any] = {}
    replicas = desired
    condition: tuple[bool, str, str] = (False, "NoScaleDown", "no scale-down in progress")
    busy = False

    if draining:
        started = _started(previous, now)
        timeout = parse_duration(inputs.drain_timeout)
        holding = [o for o in draining if o < live]  # still counted by the StatefulSet
        holding_names = [naming.pod_name(relay, o) for o in holding]
        all_drained = all(
            (r := inputs.reports.get(name)) is not None and r.ok and r.drained for name in holding_names
        )
        elapsed = (now - started).total_seconds()
        target = "no pod" if desired == 0 else ", ".join(naming.pod_name(relay, o) for o in range(desired))
        status = {
            "from": live,
            "to": desired,
            "startedAt": timestamp(started),
            "pods": names,
        }
        if not holding:
            condition = (True, "Removing", f"{', '.join(names)} drained; waiting for them to be removed")
            busy = True
        elif all_drained:
            replicas = desired
            for o in holding:
                claim = claims_by_ordinal.get(o)
                if claim is not None:
                    empty[claim.uid] = claim.name
            message = (
                f"{', '.join(holding_names)} report an empty queue; the StatefulSet shrinks to {desired}"
            )
            condition = (True, "Drained", message)
            events.append(Event("Normal", "Drained", message))
            busy = True
        elif elapsed >= timeout:
            replicas = desired
            message = (
                f"gave up draining {', '.join(holding_names)} after {inputs.drain_timeout} "
                f"(spec.scaleDown.drainTimeout): {_progress(holding_names, inputs.reports)}; their spool "
                "claims are kept with whatever they hold"
            )
            condition = (True, "DrainTimedOut", message)
            events.append(Event("Warning", "DrainTimedOut", message))
            busy = True
        else:
            replicas = live
            left = f"{inputs.drain_timeout} timeout, {max(0, int(timeout - elapsed))}s left"
            progress = _progress(holding_names, inputs.reports)
            if desired == 0:
                message = (
                    f"scale-down {live} -> 0: no pod remains to take the queue of "
                    f"{', '.join(holding_names)}; "
                    f"they stop taking mail and deliver what they can ({progress}); after the drain timeout "
                    f"({left}) they are removed and their spool claims kept"
                )
                condition = (True, "NoPeer", message)
                if previous_reason != "NoPeer":
                    events.append(Event("Warning", "NoPeer", message))
            else:
                message = f"scale-down {live} -> {desired}: draining to {target} ({progress}; {left})"
                condition = (True, "Draining", message)
                if previous_reason not in ("Draining", "NoPeer"):
                    events.append(
                        Event(
                            "Normal", "Draining", f"scale-down {live} -> {desired}: {', '.join(names)} drain"
                        )
                    )
            busy = True

    # Claims of removed ordinals: once no pod uses them and the StatefulSet will not bring one back.
    delete: list[Claim] = []
    jobs: list[Claim] = []
    kept: list[str] = []
    running: list[str] = []
    for claim in sorted(claims_by_ordinal.values(), key=lambda c: c.ordinal):
        if claim.ordinal < replicas or claim.ordinal < desired:
            empty.pop(claim.uid, None)  # a pod uses it (again): it can receive mail
            continue
        if claim.ordinal in inputs.pods:
            continue
        state = inputs.jobs.get(claim.uid)
        if claim.uid not in empty and state == "succeeded":
            empty[claim.uid] = claim.name
            events.append(Event("Normal", "ClaimDrained", f"the drain Job emptied {claim.name}"))
        if claim.uid in empty:
            if inputs.removed_claims == "Delete":
                delete.append(claim)
            continue
        if desired == 0:
            kept.append(claim.name)
        elif state is None:
            jobs.append(claim)
            running.append(claim.name)
        elif state == "running":
            running.append(claim.name)
        else:
            kept.append(claim.name)
            problems.append(f"the drain Job of {claim.name} failed")
    live_uids = {c.uid for c in inputs.claims}
    empty = {
        uid: name for uid, name in empty.items() if uid in live_uids and uid not in {c.uid for c in delete}
    }

    if not draining:
        if running:
            message = (
                f"{', '.join(running)} may hold mail of removed pods: a drain Job hands it to "
                f"{naming.pod_name(relay, 0)}"
            )
            condition = (True, "DrainingClaims", message)
            busy = True
            if previous_reason != "DrainingClaims":
                events.append(Event("Normal", "DrainingClaims", message))
        elif kept:
            why = (
                "no pod remains to take it (replicas: 0); scale up to drain it"
                if desired == 0
                else "its drain Job failed (kubectl describe job); delete the Job to try again"
            )
            message = f"{', '.join(kept)} kept: it may hold mail and {why}"
            condition = (False, "MailKept", message)
            if previous_reason != "MailKept":
                events.append(Event("Warning", "MailKept", message))
        if delete:
            busy = True
    if draining or empty or delete:
        status.setdefault("to", desired)
    if empty:
        status["emptyClaims"] = [{"name": name, "uid": uid} for uid, name in sorted(empty.items())]
    status["reason"] = condition[1]
    drain = Drain(replicas=replicas, pods=tuple(names), peers=peers) if draining else None
    return Decision(
        drain=drain,
        condition=condition,
        status=status if (draining or empty or delete or running or kept) else None,
        delete_claims=tuple(delete),
        start_jobs=tuple(jobs),
        job_target=peers[0] if peers else None,
        events=tuple(events),
        busy=busy,
        problems=tuple(problems),
    )
