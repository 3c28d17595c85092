"""Status of MailRelay and RelayRoute: metav1.Condition lists and the status bodies.

Condition semantics follow Kubernetes API conventions: one entry per type, `status` is
"True" / "False" / "Unknown", `reason` is CamelCase, `lastTransitionTime` changes only when the
status flips (a new reason or message alone keeps it), `observedGeneration` is the generation
the condition was computed from.

MailRelay: `ConfigValid` (the spec, its routes and the rendered relay config are usable; False
with reason RoutingLoop, InvalidSpec, ConfigRejected, SecretMissing, ...) and `Ready`
(ConfigValid and every desired replica ready). RelayRoute: `Accepted` (valid and selected by
a MailRelay), `Resolved` (every `relay` next hop names a usable MailRelay), `Conflicted`
(same priority and overlapping match as another route on one relay).

Called by the reconcile path with the plan from `topology` and what the StatefulSet reports.
Pure: the caller passes the clock's reading (`now`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from relay_operator import naming
from relay_operator.spec import Invalid
from relay_operator.topology import Problem, RelayPlan, RoutePlan

# The order in which reasons win when several problems make ConfigValid False.
_RELAY_REASONS = (
    "InvalidSpec",
    "PortConflict",
    "ConfigRejected",
    "RoutingLoop",
    "SecretMissing",
    "SecretKeyMissing",
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


def mailrelay_status(
    plan: RelayPlan | Invalid,
    *,
    previous: Mapping[str, Any] | None,
    statefulset_status: Mapping[str, Any] | None,
    now: datetime,
    extra_problems: Sequence[Problem] = (),
) -> dict[str, Any]:
    """The status body of a MailRelay.

    `previous` is the current status (for lastTransitionTime); `statefulset_status` the
    StatefulSet's status (None when it does not exist yet); `extra_problems` what only the
    caller can know (a Secret that does not exist, see `topology.secret_problems`).
    """
    previous = previous or {}
    conditions = previous.get("conditions") or []
    sts = statefulset_status or {}
    replicas = int(sts.get("replicas") or 0)
    ready = int(sts.get("readyReplicas") or 0)
    if isinstance(plan, Invalid):
        name, generation = plan.key.name, plan.generation
        problems: Sequence[Problem] = ()
        invalid: tuple[str, str] | None = ("InvalidSpec", "; ".join(plan.errors))
        desired = None
    else:
        name, generation = plan.relay.key.name, plan.relay.generation
        problems = [*plan.problems, *extra_problems]
        invalid = _summary(problems, _RELAY_REASONS)
        desired = plan.relay.spec.replicas
    if invalid is None:
        conditions = set_condition(
            conditions,
            "ConfigValid",
            True,
            "Valid",
            "the spec and its routes render into a valid relay configuration",
            observed_generation=generation,
            now=now,
        )
    else:
        conditions = set_condition(
            conditions, "ConfigValid", False, invalid[0], invalid[1], observed_generation=generation, now=now
        )
    if invalid is not None:
        ready_condition: tuple[bool, str, str] = (False, "ConfigInvalid", "the configuration is not valid")
    elif statefulset_status is None:
        ready_condition = (False, "Progressing", "the relay pods are being created")
    elif desired == 0:
        ready_condition = (True, "ScaledToZero", "scaled to zero replicas")
    elif desired is not None and ready >= desired and int(sts.get("updatedReplicas", ready) or 0) >= desired:
        ready_condition = (True, "Ready", f"{ready}/{desired} replicas ready")
    else:
        ready_condition = (False, "Progressing", f"{ready}/{desired} replicas ready")
    conditions = set_condition(conditions, "Ready", *ready_condition, observed_generation=generation, now=now)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "selector": naming.selector_string(name),
        "conditions": conditions,
    }
    if generation is None:
        del status["observedGeneration"]
    if not isinstance(plan, Invalid):
        status["routeCount"] = len(plan.routes)
        status["routes"] = [
            {"name": r.key.name, "priority": r.spec.priority, "nextHop": r.spec.next_hop.summary()}
            for r in plan.routes
        ]
        if plan.config is not None:
            status["configHash"] = plan.config_hash
    return status


def relayroute_status(
    plan: RoutePlan, *, previous: Mapping[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """The status body of a RelayRoute."""
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
    return status
