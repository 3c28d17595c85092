"""The single reconcile path: one namespace's MailRelays and RelayRoutes → the objects and the
status they should have, written only where they differ.

Level-triggered and idempotent: every pass reads the namespace fresh (MailRelays, RelayRoutes,
the Secrets they name, the children), plans it with `topology.plan_namespace` (the same planner
`mailrelay render` and `check` use), builds each relay's children with `builders.build_objects`,
and converges:

- a child that does not exist is created, owned by its MailRelay (controller ownerReference with
  the MailRelay's uid, so the garbage collector removes it with the MailRelay);
- a child whose applied-hash annotation or content differs from the desired object (values the
  server adds are ignored, resource quantities compare by amount: "0.5" equals the "500m" the
  server stores) is replaced (PUT with its resourceVersion: fields the operator no longer sets
  disappear, a concurrent change fails with Conflict and the pass is retried); the StatefulSet's
  immutable fields (selector, serviceName, podManagementPolicy, volumeClaimTemplates) keep their
  live values and a change to them is reported as an Event instead of a request the API server
  would refuse;
- a child that is unchanged is not written at all, so a route edit rewrites only the ConfigMap
  and a resync writes nothing;
- a child of the same name that another owner controls is left alone and reported.

A MailRelay whose spec, routes or Secrets are not usable keeps its last good children (running
relays keep relaying) and gets `ConfigValid=False` with the reason; a missing Secret is also
reported back (`RelayOutcome.retry`) so the handler retries with backoff. Status bodies come
from `conditions`; they are written (merge patch of ``/status``) only when they change. User-
fixable problems are posted as Warning Events when they appear, not on every pass.

Called by `handlers` (kopf) with a `k8s.KubeApi`. Holds no state between passes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from relay_operator import builders, conditions, naming
from relay_operator.k8s import (
    MAILRELAYS,
    RELAYROUTES,
    SECRETS,
    STATEFULSETS,
    Conflict,
    KubeApi,
    resource_for,
)
from relay_operator.spec import Invalid
from relay_operator.topology import (
    NamespacePlan,
    ObjectRef,
    Problem,
    RelayPlan,
    cluster_resolver,
    plan_namespace,
    secret_problems,
)

JSON = dict[str, Any]

APPLIED_HASH_ANNOTATION = f"{naming.GROUP}/applied-hash"
# Set by `kubectl rollout restart`; kept so that an operator update does not undo a restart.
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
STATEFULSET_IMMUTABLE = ("selector", "serviceName", "podManagementPolicy", "volumeClaimTemplates")


@dataclass(frozen=True)
class RelayOutcome:
    """What one pass did for one MailRelay."""

    name: str
    changes: tuple[str, ...] = ()  # "created ConfigMap edge-config", "updated StatefulSet edge"
    retry: str | None = None  # set when the pass should be repeated soon (a Secret is missing)
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class NamespaceOutcome:
    namespace: str
    relays: Mapping[str, RelayOutcome] = field(default_factory=dict)

    @property
    def retry_reasons(self) -> dict[str, str]:
        return {name: outcome.retry for name, outcome in self.relays.items() if outcome.retry}


def _utcnow() -> datetime:
    return datetime.now(tz=UTC)


def reconcile_namespace(
    api: KubeApi,
    namespace: str,
    *,
    relays: Collection[str] | None = None,
    cluster_domain: str = "cluster.local",
    options: builders.BuildOptions | None = None,
    now: Callable[[], datetime] = _utcnow,
) -> NamespaceOutcome:
    """Converge the MailRelays named in `relays` (all when None) and every RelayRoute status of
    `namespace`. Raises `k8s.KubeError` when the API fails (the caller retries)."""
    relay_bodies = [b for b in api.list(MAILRELAYS, namespace) if not _deleting(b)]
    route_bodies = [b for b in api.list(RELAYROUTES, namespace) if not _deleting(b)]
    plan = plan_namespace(namespace, relay_bodies, route_bodies, resolver=cluster_resolver(cluster_domain))
    outcomes: dict[str, RelayOutcome] = {}
    for body in relay_bodies:
        name = body["metadata"]["name"]
        if relays is None or name in relays:
            outcomes[name] = _reconcile_relay(api, body, plan, options or builders.BuildOptions(), now())
    _reconcile_routes(api, route_bodies, plan, now())
    return NamespaceOutcome(namespace, outcomes)


# --------------------------------------------------------------------------- one MailRelay


def _deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def _secret_keys(api: KubeApi, namespace: str) -> Callable[[str], Mapping[str, Any] | None]:
    cache: dict[str, Mapping[str, Any] | None] = {}

    def lookup(name: str) -> Mapping[str, Any] | None:
        if name not in cache:
            secret = api.get(SECRETS, namespace, name)
            cache[name] = (
                None if secret is None else {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
            )
        return cache[name]

    return lookup


def _reconcile_relay(
    api: KubeApi, body: JSON, plan: NamespacePlan, options: builders.BuildOptions, now: datetime
) -> RelayOutcome:
    namespace, name = body["metadata"].get("namespace", plan.namespace), body["metadata"]["name"]
    relay_plan = plan.relays.get(name)
    target: RelayPlan | Invalid = relay_plan if relay_plan is not None else plan.invalid_relays[name]
    extra: list[Problem] = []
    changes: list[str] = []
    retry = None
    if relay_plan is not None:
        extra += secret_problems(relay_plan, _secret_keys(api, namespace))
        missing = [p.message for p in extra if p.reason == "SecretMissing"]
        if missing:
            retry = "; ".join(missing)
        if relay_plan.valid and not any(p.severity == "error" for p in extra):
            changes, apply_problems = _apply_children(api, body, relay_plan, options)
            extra += apply_problems
    statefulset = api.get(STATEFULSETS, namespace, naming.statefulset_name(name))
    if statefulset is not None and not _controlled_by(statefulset, body):
        statefulset = None
    previous = body.get("status") or {}
    status = conditions.mailrelay_status(
        target,
        previous=previous,
        statefulset_status=None if statefulset is None else (statefulset.get("status") or {}),
        now=now,
        extra_problems=extra,
    )
    if status != previous:
        patch = {**{key: None for key in previous if key not in status}, **status}
        api.merge_patch(MAILRELAYS, namespace, name, {"status": patch}, subresource="status")
    _announce_relay(api, body, previous, status, changes)
    problems = tuple(relay_plan.problems if relay_plan else ()) + tuple(extra)
    return RelayOutcome(name, tuple(changes), retry, problems)


def _announce_relay(
    api: KubeApi, body: JSON, previous: Mapping[str, Any], status: Mapping[str, Any], changes: Sequence[str]
) -> None:
    """Events for `kubectl describe`: problems when they appear, recovery, applied changes."""
    before = conditions.find_condition(previous.get("conditions"), "ConfigValid")
    after = conditions.find_condition(status.get("conditions"), "ConfigValid")
    if after is not None and after.get("status") == "False":
        if before is None or _condition_text(before) != _condition_text(after):
            api.post_event(body, type_="Warning", reason=str(after["reason"]), message=str(after["message"]))
    elif after is not None and before is not None and before.get("status") == "False":
        api.post_event(body, type_="Normal", reason="ConfigValid", message=str(after["message"]))
    if changes:
        api.post_event(body, type_="Normal", reason="Applied", message="; ".join(changes))


def _condition_text(condition: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return condition.get("status"), condition.get("reason"), condition.get("message")


# --------------------------------------------------------------------------- children


def _controlled_by(child: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = owner["metadata"]["uid"]
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in (child.get("metadata") or {}).get("ownerReferences") or []
    )


def _has_controller(child: Mapping[str, Any]) -> bool:
    return any(ref.get("controller") for ref in (child.get("metadata") or {}).get("ownerReferences") or [])


def desired_hash(manifest: Mapping[str, Any]) -> str:
    """A stable hash of a desired object (what the applied-hash annotation records)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[
        :16
    ]


# Maps of resource quantities (ResourceRequirements, PVC requests): the API server stores their
# values in canonical form ("0.5" becomes "500m", "1024Mi" becomes "1Gi").
_QUANTITY_MAPS = frozenset({"requests", "limits"})
_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:[eE]([+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$"
)
_QUANTITY_SCALE = {
    **{
        suffix: Decimal(1024) ** power
        for power, suffix in enumerate(("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))
    },
    **{suffix: Decimal(10) ** exp for suffix, exp in (("n", -9), ("u", -6), ("m", -3), ("k", 3), ("M", 6))},
    **{suffix: Decimal(10) ** exp for suffix, exp in (("G", 9), ("T", 12), ("P", 15), ("E", 18))},
}


def quantity_value(value: Any) -> Decimal | None:
    """The number a Kubernetes quantity ("500m", "1Gi", "1e3", 2) stands for; None if it is none."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    match = _QUANTITY.match(str(value))
    if match is None:
        return None
    number, exponent, suffix = match.groups()
    scale = Decimal(10) ** int(exponent) if exponent else _QUANTITY_SCALE[suffix or ""]
    return Decimal(number) * scale


def contains(live: Any, desired: Any, *, quantities: bool = False) -> bool:
    """Whether `live` carries everything `desired` sets (values the server added are allowed:
    defaults, status, metadata it owns). Lists must have the same length, item by item. Values
    of resource quantity maps compare by the amount they stand for, not their spelling, so that
    the server's canonical form is not mistaken for drift."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v, quantities=quantities or k in _QUANTITY_MAPS)
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b, quantities=quantities) for a, b in zip(live, desired, strict=True))
        )
    if quantities and live != desired:
        amount = quantity_value(desired)
        return amount is not None and quantity_value(live) == amount
    return bool(live == desired)


def _with_hash(manifest: Mapping[str, Any]) -> tuple[JSON, str]:
    desired = copy.deepcopy(dict(manifest))
    digest = desired_hash(desired)
    desired["metadata"].setdefault("annotations", {})[APPLIED_HASH_ANNOTATION] = digest
    return desired, digest


def _merge_live(desired: JSON, live: Mapping[str, Any]) -> tuple[JSON, list[str]]:
    """The body to PUT: desired, plus what must survive from live (resourceVersion, labels and
    annotations others set, StatefulSet immutable fields). Returns it and the immutable fields
    whose desired value could not be applied."""
    body = copy.deepcopy(desired)
    live_meta = live.get("metadata") or {}
    meta = body["metadata"]
    meta["resourceVersion"] = live_meta.get("resourceVersion")
    for key in ("labels", "annotations"):
        merged = {**(live_meta.get(key) or {}), **(meta.get(key) or {})}
        if merged:
            meta[key] = merged
    blocked: list[str] = []
    if body.get("kind") == "StatefulSet":
        live_spec = live.get("spec") or {}
        for key in STATEFULSET_IMMUTABLE:
            if key in live_spec:
                if not contains(live_spec[key], body["spec"].get(key)):
                    blocked.append(key)
                body["spec"][key] = copy.deepcopy(live_spec[key])
        live_template = ((live_spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
        if RESTARTED_AT_ANNOTATION in live_template:
            template_meta = body["spec"]["template"].setdefault("metadata", {})
            template_meta.setdefault("annotations", {})[RESTARTED_AT_ANNOTATION] = live_template[
                RESTARTED_AT_ANNOTATION
            ]
    return body, blocked


def _apply_children(
    api: KubeApi, owner: JSON, plan: RelayPlan, options: builders.BuildOptions
) -> tuple[list[str], list[Problem]]:
    changes: list[str] = []
    problems: list[Problem] = []
    subject = ObjectRef(naming.MAILRELAY_KIND, plan.relay.key.namespace, plan.relay.key.name)
    for manifest in builders.build_objects(plan, options, owners=[builders.owner_reference(owner)]):
        change, problem = _apply(api, owner, manifest, subject)
        if change:
            changes.append(change)
        if problem:
            problems.append(problem)
    return changes, problems


def _apply(
    api: KubeApi, owner: JSON, manifest: Mapping[str, Any], subject: ObjectRef
) -> tuple[str | None, Problem | None]:
    resource = resource_for(manifest["apiVersion"], manifest["kind"])
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    label = f"{manifest['kind']} {name}"
    desired, digest = _with_hash(manifest)
    for attempt in range(2):
        live = api.get(resource, namespace, name)
        if live is None:
            api.create(resource, namespace, desired)
            return f"created {label}", None
        if not _controlled_by(live, owner):
            managed = (live["metadata"].get("labels") or {}).get(naming.LABEL_MANAGED_BY) == naming.MANAGED_BY
            if _has_controller(live) or not managed:
                return None, Problem(
                    subject,
                    "ObjectConflict",
                    f"{label} exists and is not managed by this MailRelay; delete or rename it",
                )
        body, blocked = _merge_live(desired, live)
        same_hash = (live["metadata"].get("annotations") or {}).get(APPLIED_HASH_ANNOTATION) == digest
        if same_hash and contains(live, _without_status(body)):
            return None, None
        try:
            api.replace(resource, namespace, name, body)
        except Conflict:
            if attempt == 0:
                continue
            raise
        if blocked and not same_hash:
            api.post_event(
                owner,
                type_="Warning",
                reason="ImmutableField",
                message=(
                    f"{label}: {', '.join(blocked)} cannot change on an existing StatefulSet; delete the "
                    "StatefulSet with --cascade=orphan to let the operator recreate it (spool volumes stay)"
                ),
            )
        return f"updated {label}", None
    return None, None  # pragma: no cover - the loop returns or raises


def _without_status(body: Mapping[str, Any]) -> JSON:
    result = dict(body)
    result.pop("status", None)
    result["metadata"] = {k: v for k, v in body["metadata"].items() if k != "resourceVersion"}
    return result


# --------------------------------------------------------------------------- RelayRoutes


def _reconcile_routes(api: KubeApi, route_bodies: Sequence[JSON], plan: NamespacePlan, now: datetime) -> None:
    for body in route_bodies:
        name = body["metadata"]["name"]
        route_plan = plan.routes.get(name)
        if route_plan is None:
            continue
        previous = body.get("status") or {}
        status = conditions.relayroute_status(route_plan, previous=previous, now=now)
        if status == previous:
            continue
        patch = {**{key: None for key in previous if key not in status}, **status}
        api.merge_patch(
            RELAYROUTES,
            body["metadata"].get("namespace", plan.namespace),
            name,
            {"status": patch},
            subresource="status",
        )
        for type_, bad in (("Accepted", "False"), ("Resolved", "False"), ("Conflicted", "True")):
            before = conditions.find_condition(previous.get("conditions"), type_)
            after = conditions.find_condition(status.get("conditions"), type_)
            if after is None or after.get("status") != bad:
                continue
            if before is None or _condition_text(before) != _condition_text(after):
                api.post_event(
                    body, type_="Warning", reason=str(after["reason"]), message=str(after["message"])
                )
