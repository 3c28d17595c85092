"""Status of MailRelay and RelayRoute: metav1.Condition lists and the status bodies.

Condition semantics follow Kubernetes API conventions: one entry per type, `status` is
"True" / "False" / "Unknown", `reason` is CamelCase, `lastTransitionTime` changes only when the
status flips (a new reason or message alone keeps it), `observedGeneration` is the generation
the condition was computed from.

MailRelay: `ConfigValid` (the spec, its routes and the rendered relay config are usable; False
with reason RoutingLoop, InvalidSpec, ConfigRejected, SecretMissing, ...), `Applied` (every
child object matches the spec; False with reason ApiRejected and the API server's message,
ObjectConflict, StorageShrink / StorageClassChange / StorageNotExpandable / ImmutableField with
the live and the wanted value, or Recreating while a step is in progress) and `Ready`
(ConfigValid, Applied, and the StatefulSet rolled out: its controller has seen the current
generation, every pod runs the current revision and every desired replica is ready).
`Draining` (a scale-down in progress: True with reason Draining, NoPeer, Drained, DrainTimedOut,
Removing or DrainingClaims; False with NoScaleDown, or MailKept when a removed pod's claim keeps
mail nobody can take; see `scaledown`). `RelaySafe` (issue 17: False with reason OpenRelay when
an outside client could relay through the rendered configuration, judged by the relay's own
RCPT rule over the open-relay probe set, relay.core.open_relay; True with NoOpenRelay).
RelayRoute: `Accepted` (valid and selected by a MailRelay), `Resolved` (every `relay` next hop
names a usable MailRelay), `Conflicted` (same priority and overlapping match as another route
on one relay).

Called by the reconcile path with the plan from `topology` and what the StatefulSet reports.
Pure: the caller passes the clock's reading (`now`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from relay.config import RelayConfig
from relay.core import open_relay
from relay_operator import naming
from relay_operator.queues import QueueReport
from relay_operator.spec import InvalidSpec
from relay_operator.topology import Problem, RelayPlan, RoutePlan

# The order in which reasons win when several problems make ConfigValid False.
_RELAY_REASONS = (
    "InvalidSpec",
    "PortConflict",
    "ConfigRejected",
    "RoutingLoop",
    "SecretMissing",
    "SecretKeyMissing",
    "DkimKeyInvalid",
)
# The order in which reasons win when several problems make Applied False.
_APPLY_REASONS = (
    "ApiRejected",
    "ObjectConflict",
    "StorageShrink",
    "StorageClassChange",
    "StorageNotExpandable",
    "ImmutableField",
)


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with second precision, as the API server writes metav1.Time."""
    return now.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def find_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    *,
    observed_generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new list with the condition of `type_` set; its lastTransitionTime is kept unless the
    status changes. Other conditions are kept as they are, in their order."""
    value = ("True" if status else "False") if isinstance(status, bool) else status
    if value not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    previous = find_condition(conditions, type_)
    transition = timestamp(now)
    if previous is not None and previous.get("status") == value and previous.get("lastTransitionTime"):
        transition = str(previous["lastTransitionTime"])
    entry: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": transition,
    }
    if observed_generation is not None:
        entry["observedGeneration"] = observed_generation
    result = [dict(c) for c in conditions or () if c.get("type") != type_]
    position = next((i for i, c in enumerate(conditions or ()) if c.get("type") == type_), len(result))
    result.insert(position, entry)
    return result


def _summary(problems: Sequence[Problem], reasons: Sequence[str]) -> tuple[str, str] | None:
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return None
    rank = {reason: index for index, reason in enumerate(reasons)}
    errors = sorted(errors, key=lambda p: rank.get(p.reason, len(rank)))
    reason = errors[0].reason
    return reason, "; ".join(p.message for p in errors)


def statefulset_rollout(statefulset: Mapping[str, Any] | None, desired: int) -> tuple[bool, str, str]:
    """(rolled out, reason, message) from a StatefulSet as its controller reports it.

    Rolled out means: the controller has seen the current spec (``status.observedGeneration``
    equals ``metadata.generation``), every pod runs the current template (``updateRevision``
    equals ``currentRevision``, which the controller sets once every pod is updated and ready;
    without revisions, ``updatedReplicas`` covers every desired replica) and `desired` pods are
    ready. The real status omits fields that are zero, so an absent count is 0, never "all".
    """
    if statefulset is None:
        return False, "Progressing", "the relay pods are being created"
    generation = int((statefulset.get("metadata") or {}).get("generation") or 0)
    sts = statefulset.get("status") or {}
    observed = int(sts.get("observedGeneration") or 0)
    if observed < generation:
        return False, "Progressing", f"the StatefulSet controller has not yet seen generation {generation}"
    ready = int(sts.get("readyReplicas") or 0)
    updated = int(sts.get("updatedReplicas") or 0)
    current_revision, update_revision = sts.get("currentRevision"), sts.get("updateRevision")
    rolled = current_revision == update_revision if update_revision else updated >= desired
    if desired == 0:
        if int(sts.get("replicas") or 0) == 0:
            return True, "ScaledToZero", "scaled to zero replicas"
        return False, "Progressing", f"scaling to zero: {sts.get('replicas')} pods remain"
    if rolled and ready >= desired:
        return True, "Ready", f"{ready}/{desired} replicas ready"
    return False, "Progressing", f"{ready}/{desired} replicas ready, {updated}/{desired} updated"


def relay_safe(config: RelayConfig, reports: Sequence[QueueReport] = ()) -> tuple[bool, str, str]:
    """``RelaySafe``: False when a pod's own self-check (its /queue ``relaySafe``) relayed a
    probe, or when the open-relay probe set (relay.core.open_relay), judged by the relay's own
    RCPT rule against the rendered configuration, would be accepted from a client outside the
    cluster; True otherwise (naming the pods whose self-check passed)."""
    open_pods = sorted(r.pod for r in reports if r.ok and r.relay_safe is False)
    if open_pods:
        return (
            False,
            "OpenRelay",
            f"the open-relay self-check of {', '.join(open_pods)} relayed a probe (see its log)",
        )
    relayed = open_relay.relayed_by_config(config)
    if relayed:
        return (
            False,
            "OpenRelay",
            f"an outside client could relay to any domain ({', '.join(relayed)}): check trustedNetworks",
        )
    probes = len(open_relay.probes(config.hostname))
    checked = sorted(r.pod for r in reports if r.ok and r.relay_safe is True)
    live = f"; the self-check of {', '.join(checked)} relayed none" if checked else ""
    return (
        True,
        "NoOpenRelay",
        f"none of {probes} third-party relay probes is accepted from an outside client{live}",
    )


def mailrelay_status(
    plan: RelayPlan | InvalidSpec,
    *,
    previous: Mapping[str, Any] | None,
    statefulset: Mapping[str, Any] | None,
    now: datetime,
    extra_problems: Sequence[Problem] = (),
    apply_problems: Sequence[Problem] = (),
    draining: tuple[bool, str, str] | None = None,
    queue: Mapping[str, Any] | None = None,
    scale_down: Mapping[str, Any] | None = None,
    self_checks: Sequence[QueueReport] = (),
) -> dict[str, Any]:
    """The status body of a MailRelay.

    `previous` is the current status (for lastTransitionTime); `statefulset` the live
    StatefulSet (None when it does not exist yet); `extra_problems` what makes the configuration
    unusable that only the caller can know (a Secret that does not exist, see
    `topology.secret_problems`); `apply_problems` what kept the children from matching the spec
    (an API refusal, an object of the same name owned by someone else, a volume that cannot
    grow): errors, or warnings for work still in progress. `draining` is the `Draining`
    condition (status, reason, message) from `scaledown.decide`, `queue` the pods' queues
    (`queue_status`) and `scale_down` the scale-down bookkeeping; each is left out when None.
    `self_checks` are the pods' reports whose ``relaySafe`` feeds the `RelaySafe` condition.
    """
    previous = previous or {}
    conditions = previous.get("conditions") or []
    sts = (statefulset or {}).get("status") or {}
    if isinstance(plan, InvalidSpec):
        name, generation = plan.key.name, plan.generation
        problems: Sequence[Problem] = ()
        invalid: tuple[str, str] | None = ("InvalidSpec", "; ".join(plan.errors))
        desired = 0
    else:
        name, generation = plan.relay.key.name, plan.relay.generation
        problems = [*plan.problems, *extra_problems]
        invalid = _summary(problems, _RELAY_REASONS)
        desired = plan.relay.spec.replicas
    valid = (True, "Valid", "the spec and its routes render into a valid relay configuration")
    config_valid = valid if invalid is None else (False, *invalid)
    conditions = set_condition(
        conditions, "ConfigValid", *config_valid, observed_generation=generation, now=now
    )
    failed = None if invalid is not None else _summary(apply_problems, _APPLY_REASONS)
    if invalid is not None:
        applied: tuple[bool, str, str] = (
            False,
            "ConfigInvalid",
            "the children keep the last valid configuration",
        )
    else:
        pending = [p for p in apply_problems if p.severity != "error"]
        if failed is not None:
            applied = (False, *failed)
        elif pending:
            applied = (False, pending[0].reason, "; ".join(p.message for p in pending))
        else:
            applied = (True, "Applied", "every object the spec asks for is in place")
    conditions = set_condition(conditions, "Applied", *applied, observed_generation=generation, now=now)
    if invalid is not None:
        ready_condition: tuple[bool, str, str] = (False, "ConfigInvalid", "the configuration is not valid")
    elif failed is not None:
        ready_condition = (False, "NotApplied", applied[2])
    elif not applied[0]:
        ready_condition = (False, "Progressing", applied[2])
    else:
        ready_condition = statefulset_rollout(statefulset, desired)
    conditions = set_condition(conditions, "Ready", *ready_condition, observed_generation=generation, now=now)
    if not isinstance(plan, InvalidSpec) and plan.config is not None:
        conditions = set_condition(
            conditions,
            "RelaySafe",
            *relay_safe(plan.config, self_checks),
            observed_generation=generation,
            now=now,
        )
    if draining is not None:
        conditions = set_condition(conditions, "Draining", *draining, observed_generation=generation, now=now)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": int(sts.get("replicas") or 0),
        "readyReplicas": int(sts.get("readyReplicas") or 0),
        "selector": naming.selector_string(name),
        "conditions": conditions,
    }
    if generation is None:
        del status["observedGeneration"]
    if not isinstance(plan, InvalidSpec):
        status["routeCount"] = len(plan.routes)
        status["routes"] = [
            {"name": r.key.name, "priority": r.spec.priority, "nextHop": r.spec.next_hop.summary()}
            for r in plan.routes
        ]
        if plan.config is not None:
            status["configHash"] = plan.config_hash
    if queue is not None:
        status["queue"] = dict(queue)
    if scale_down is not None:
        status["scaleDown"] = dict(scale_down)
    return status


def queue_status(reports: Sequence[QueueReport]) -> dict[str, Any]:
    """``status.queue``: every pod's report, and the sums over the pods that answered (the
    oldest age is the largest). Ages are whole seconds, so a status does not change on every
    pass for a fraction of a second."""
    answered = [r for r in reports if r.ok]
    pods: list[dict[str, Any]] = []
    for report in sorted(reports, key=lambda r: r.pod):
        entry: dict[str, Any] = {"name": report.pod}
        if report.ok:
            entry.update(
                depth=report.depth,
                oldestAgeSeconds=int(report.oldest_age_seconds),
                deferred=report.deferred,
                held=report.held,
                draining=report.draining,
                drained=report.drained,
                handedOff=report.handed_off,
            )
        else:
            entry["error"] = str(report.error)
        pods.append(entry)
    return {
        "depth": sum(r.depth for r in answered),
        "oldestAgeSeconds": int(max((r.oldest_age_seconds for r in answered), default=0)),
        "deferred": sum(r.deferred for r in answered),
        "held": sum(r.held for r in answered),
        "reporting": len(answered),
        "pods": pods,
    }


def relayroute_status(
    plan: RoutePlan,
    *,
    previous: Mapping[str, Any] | None,
    now: datetime,
    dkim: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The status body of a RelayRoute; `dkim` is `topology.dkim_records` (the DNS records to
    publish for the route's keys), listed as ``status.dkim`` when the route has keys."""
    previous = previous or {}
    conditions: list[dict[str, Any]] = list(previous.get("conditions") or [])
    generation = plan.generation
    invalid = [p for p in plan.problems if p.reason == "InvalidSpec"]
    if invalid:
        accepted: tuple[bool, str, str] = (False, "InvalidSpec", "; ".join(p.message for p in invalid))
    elif not plan.relays:
        accepted = (False, "NotSelected", "no MailRelay's routeSelector selects this route")
    else:
        accepted = (True, "Accepted", f"used by MailRelay {', '.join(plan.relays)}")
    conditions = set_condition(conditions, "Accepted", *accepted, observed_generation=generation, now=now)

    unresolved = [p for p in plan.problems if p.reason in ("UnknownRelay", "NoRelayListener")]
    if invalid:
        resolved: tuple[bool | str, str, str] = ("Unknown", "InvalidSpec", "the spec is not valid")
    elif unresolved:
        resolved = (False, unresolved[0].reason, "; ".join(p.message for p in unresolved))
    else:
        resolved = (True, "Resolved", "every next hop is known")
    conditions = set_condition(conditions, "Resolved", *resolved, observed_generation=generation, now=now)

    conflicts = [p for p in plan.problems if p.reason == "Conflict"]
    if conflicts:
        conflicted: tuple[bool, str, str] = (True, "Conflict", "; ".join(p.message for p in conflicts))
    else:
        conflicted = (False, "NoConflict", "no route with the same priority overlaps this one")
    conditions = set_condition(conditions, "Conflicted", *conflicted, observed_generation=generation, now=now)
    status: dict[str, Any] = {
        "nextHop": plan.next_hop_summary,
        "relays": list(plan.relays),
        "conditions": conditions,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if dkim:
        status["dkim"] = [dict(entry) for entry in dkim]
    return status
