"""The single reconcile path: one namespace's MailRelays and RelayRoutes → the objects and the
status they should have, written only where they differ.

Level-triggered and idempotent: every pass reads the namespace fresh (MailRelays, RelayRoutes,
the Secrets they name, the children), plans it with `topology.plan_namespace` (the same planner
`mailrelay render` and `check` use), builds each relay's children with `builders.build_objects`,
and converges:

- a child that does not exist is created, owned by its MailRelay (controller ownerReference with
  the MailRelay's uid and blockOwnerDeletion, so the garbage collector removes it with the
  MailRelay and a foreground deletion waits for it);
- a child whose applied-hash annotation or content differs from the desired object (values the
  server adds are ignored, resource quantities compare by amount: "0.5" equals the "500m" the
  server stores) is replaced (PUT with its resourceVersion: fields the operator no longer sets
  disappear, a concurrent change fails with Conflict and the pass is retried once). Labels and
  annotations others set survive; the keys the operator set are listed in the
  `managed-metadata` annotation, so a key the spec no longer asks for (a LoadBalancer annotation
  removed from ``spec.service.annotations``) is removed;
- the StatefulSet's immutable fields (selector, serviceName, podManagementPolicy,
  volumeClaimTemplates) keep their live values. A different spool claim template is applied
  the way an administrator would: when the size grows and every existing ``spool-<relay>-N``
  claim's StorageClass allows expansion, each smaller claim's request is patched, then the
  StatefulSet is deleted with ``propagationPolicy: Orphan`` (its pods keep running and serving)
  and created again on a later pass with the new template, adopting the pods. What cannot be
  done (a smaller size, another StorageClass, a class without ``allowVolumeExpansion``, another
  immutable field) is a lasting `Applied=False` condition naming the live and the wanted value;
- a child that is unchanged is not written at all, so a route edit rewrites only the ConfigMap
  and a resync writes nothing;
- a child of the same name that another owner controls, or that has no owner at all, is left
  alone and reported (`ObjectConflict`): changing an object's ownerReferences needs the right to
  delete it under the OwnerReferencesPermissionEnforcement admission plugin, which the operator
  does not hold for these kinds.

A write the API server refuses (403 Forbidden, 422 Invalid) does not end the pass: it becomes
`Applied=False` with reason `ApiRejected` and the server's message, the status is written, and
the outcome asks for a retry (`RelayOutcome.retry`, kopf retries with backoff).

A MailRelay whose spec, routes or Secrets are not usable keeps its last good children (running
relays keep relaying) and gets `ConfigValid=False` with the reason; a missing Secret is also
reported back as a retry. Status bodies come from `conditions`; `_write_status` is the one path
that writes them (merge patch of ``/status``, only when they change) and posts the Events of
conditions that turned bad (Warning, once per new reason or message) or recovered.

A lower ``spec.replicas`` is carried out by the same pass (`scaledown` decides, see there): the
pods' queues are read (`queues.QueueProbe`, GET /queue on each pod's IP) into ``status.queue``;
while the highest ordinals drain, the ConfigMap names them in ``drain`` and the StatefulSet keeps
its size; it is lowered once they report empty (or the drain timeout gave up); spool claims of
removed pods are deleted once verified empty, or emptied by a drain Job first. Each relay's
hand-off Secret is created once with a random credential and never rewritten (the running pods
hold it). `RelayOutcome.busy` asks the caller for another pass soon while that goes on.

Called by `handlers` (kopf and the operator's resync loop) with a `k8s.KubeApi`. Holds no state
between passes (the scale-down's start and the claims verified empty are in the MailRelay's
status). Deletes a StatefulSet it recreates (with Orphan propagation) and spool claims verified
empty (by uid); nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from relay_operator import builders, conditions, naming, scaledown
from relay_operator.k8s import (
    JOBS,
    MAILRELAYS,
    PERSISTENTVOLUMECLAIMS,
    PODS,
    RELAYROUTES,
    SECRETS,
    STATEFULSETS,
    STORAGECLASSES,
    AlreadyExists,
    Conflict,
    Forbidden,
    Invalid,
    KubeApi,
    NotFound,
    Resource,
    resource_for,
)
from relay_operator.queues import QueueProbe, QueueReport
from relay_operator.spec import InvalidSpec
from relay_operator.topology import (
    NamespacePlan,
    ObjectRef,
    Problem,
    RelayPlan,
    cluster_resolver,
    dkim_records,
    plan_namespace,
    secret_problems,
)

JSON = dict[str, Any]

APPLIED_HASH_ANNOTATION = f"{naming.GROUP}/applied-hash"
# The label and annotation keys the operator set on a child (JSON: {"annotations": [...],
# "labels": [...]}): on the next write, those the desired object no longer has are removed.
MANAGED_METADATA_ANNOTATION = f"{naming.GROUP}/managed-metadata"
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
    busy: bool = False  # a scale-down is under way: poll again soon (not an error)
    conditions: Mapping[str, str] = field(default_factory=dict)  # type -> status, as written


@dataclass(frozen=True)
class NamespaceOutcome:
    namespace: str
    relays: Mapping[str, RelayOutcome] = field(default_factory=dict)
    relay_count: int = 0  # MailRelays in the namespace (not being deleted), reconciled or not

    @property
    def retry_reasons(self) -> dict[str, str]:
        return {name: outcome.retry for name, outcome in self.relays.items() if outcome.retry}

    @property
    def busy(self) -> bool:
        return any(outcome.busy for outcome in self.relays.values())


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
    probe: QueueProbe | None = None,
) -> NamespaceOutcome:
    """Converge the MailRelays named in `relays` (all when None) and every RelayRoute status of
    `namespace`. `probe` reads each pod's queue (None: no pod is asked, every report says so).
    Raises `k8s.KubeError` when the API fails (the caller retries)."""
    relay_bodies = [b for b in api.list(MAILRELAYS, namespace) if not _deleting(b)]
    route_bodies = [b for b in api.list(RELAYROUTES, namespace) if not _deleting(b)]
    plan = plan_namespace(namespace, relay_bodies, route_bodies, resolver=cluster_resolver(cluster_domain))
    outcomes: dict[str, RelayOutcome] = {}
    for body in relay_bodies:
        name = body["metadata"]["name"]
        if relays is None or name in relays:
            context = _Pass(options or builders.BuildOptions(), now(), cluster_domain, probe)
            outcomes[name] = _reconcile_relay(api, body, plan, context)
    _reconcile_routes(api, route_bodies, plan, now())
    return NamespaceOutcome(namespace, outcomes, len(relay_bodies))


# --------------------------------------------------------------------------- status and Events


@dataclass(frozen=True)
class _Announced:
    """A condition worth an Event: Warning when it turns `bad` (or changes while bad)."""

    type: str
    bad: str
    recovery: bool = False  # also a Normal Event when it stops being bad
    quiet: frozenset[str] = frozenset()  # reasons that are progress, not problems


@dataclass(frozen=True)
class _Pass:
    """What every relay of one pass shares."""

    options: builders.BuildOptions
    now: datetime
    cluster_domain: str = "cluster.local"
    probe: QueueProbe | None = None


_RELAY_ANNOUNCED = (
    _Announced("ConfigValid", "False", recovery=True),
    _Announced("Applied", "False", quiet=frozenset({"ConfigInvalid", "Recreating"})),
)
_ROUTE_ANNOUNCED = (
    _Announced("Accepted", "False"),
    _Announced("Resolved", "False"),
    _Announced("Conflicted", "True"),
)


def _write_status(
    api: KubeApi,
    resource: Resource,
    body: JSON,
    namespace: str,
    status: Mapping[str, Any],
    announced: Sequence[_Announced],
) -> None:
    """The one way a status is written: a merge patch of ``/status`` when it changed (keys it
    no longer has are removed), then the Events of its announced conditions."""
    previous = body.get("status") or {}
    if status == previous:
        return
    patch = {**{key: None for key in previous if key not in status}, **status}
    api.merge_patch(resource, namespace, body["metadata"]["name"], {"status": patch}, subresource="status")
    for entry in announced:
        before = conditions.find_condition(previous.get("conditions"), entry.type)
        after = conditions.find_condition(status.get("conditions"), entry.type)
        if after is None:
            continue
        if after.get("status") == entry.bad:
            if after.get("reason") in entry.quiet:
                continue
            if before is None or _condition_text(before) != _condition_text(after):
                api.post_event(
                    body, type_="Warning", reason=str(after["reason"]), message=str(after["message"])
                )
        elif entry.recovery and before is not None and before.get("status") == entry.bad:
            api.post_event(body, type_="Normal", reason=entry.type, message=str(after["message"]))


def _condition_text(condition: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return condition.get("status"), condition.get("reason"), condition.get("message")


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


@dataclass
class _Applied:
    """What applying one relay's children did: changes, problems for `Applied`, retry reasons."""

    changes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)


def _reconcile_relay(api: KubeApi, body: JSON, plan: NamespacePlan, context: _Pass) -> RelayOutcome:
    namespace, name = body["metadata"].get("namespace", plan.namespace), body["metadata"]["name"]
    relay_plan = plan.relays.get(name)
    target: RelayPlan | InvalidSpec = relay_plan if relay_plan is not None else plan.invalid_relays[name]
    extra: list[Problem] = []
    applied = _Applied()
    retry: list[str] = []
    decision: scaledown.Decision | None = None
    reports: list[QueueReport] = []
    statefulset = api.get(STATEFULSETS, namespace, naming.statefulset_name(name))
    if statefulset is not None and not _controlled_by(statefulset, body):
        statefulset = None
    if relay_plan is not None:
        extra += secret_problems(relay_plan, _secret_keys(api, namespace))
        retry += [p.message for p in extra if p.reason == "SecretMissing"]
        if relay_plan.valid and not any(p.severity == "error" for p in extra):
            decision, reports = _scale_down(api, body, relay_plan, statefulset, context)
            _ensure_handoff_secret(api, body, relay_plan, applied)
            applied = _apply_children(api, body, relay_plan, context.options, decision.drain, applied)
            _apply_scale_down(api, body, relay_plan, context.options, decision, applied)
            retry += applied.retry
            statefulset = api.get(STATEFULSETS, namespace, naming.statefulset_name(name))
            if statefulset is not None and not _controlled_by(statefulset, body):
                statefulset = None
    status = conditions.mailrelay_status(
        target,
        previous=body.get("status") or {},
        statefulset=statefulset,
        now=context.now,
        extra_problems=extra,
        apply_problems=applied.problems,
        draining=decision.condition if decision is not None else None,
        queue=conditions.queue_status(reports) if decision is not None else None,
        scale_down=decision.status if decision is not None else None,
        self_checks=reports if decision is not None else (),
    )
    if decision is None:  # an unusable spec keeps the last queue and scale-down bookkeeping
        previous = body.get("status") or {}
        for key in ("queue", "scaleDown"):
            if key in previous:
                status[key] = previous[key]
        previous_draining = conditions.find_condition(previous.get("conditions"), "Draining")
        if previous_draining is not None:
            status["conditions"].append(dict(previous_draining))
    _write_status(api, MAILRELAYS, body, namespace, status, _RELAY_ANNOUNCED)
    if applied.changes:
        api.post_event(body, type_="Normal", reason="Applied", message="; ".join(applied.changes))
    for event in decision.events if decision is not None else ():
        api.post_event(body, type_=event.type, reason=event.reason, message=event.message)
    problems = (*(relay_plan.problems if relay_plan else ()), *extra, *applied.problems)
    busy = decision is not None and decision.busy
    written = {
        c["type"]: c["status"] for c in status.get("conditions") or () if "type" in c and "status" in c
    }
    return RelayOutcome(
        name, tuple(applied.changes), "; ".join(retry) or None, problems, busy, conditions=written
    )


# --------------------------------------------------------------------------- scale-down


def _scale_down(
    api: KubeApi, owner: JSON, plan: RelayPlan, statefulset: Mapping[str, Any] | None, context: _Pass
) -> tuple[scaledown.Decision, list[QueueReport]]:
    """Read what `scaledown.decide` needs (pods and their queues, spool claims, drain Jobs)."""
    namespace, name = plan.relay.key.namespace, plan.relay.key.name
    selector = naming.selector_string(name)
    pods: dict[int, JSON] = {}
    for pod in api.list(PODS, namespace, selector):
        ordinal = naming.pod_ordinal(name, pod["metadata"]["name"])
        if ordinal is not None and not _deleting(pod):
            pods[ordinal] = pod
    reports = _probe_pods(
        [pod for _ordinal, pod in sorted(pods.items())], context.probe, plan.context.metrics_port
    )
    claims = []
    for claim in api.list(PERSISTENTVOLUMECLAIMS, namespace, selector):
        ordinal = naming.claim_ordinal(name, claim["metadata"]["name"])
        if ordinal is not None:
            claims.append(
                scaledown.Claim(
                    claim["metadata"]["name"], claim["metadata"]["uid"], ordinal, _deleting(claim)
                )
            )
    jobs: dict[str, scaledown.JobState] = {}
    if any(c.ordinal >= plan.relay.spec.replicas for c in claims):
        for job in api.list(JOBS, namespace, selector):
            uid = (job["metadata"].get("annotations") or {}).get(naming.CLAIM_UID_ANNOTATION)
            if uid and _controlled_by(job, owner):
                jobs[uid] = _job_state(job)
    spec = plan.relay.spec
    live = (statefulset or {}).get("spec", {}).get("replicas") if statefulset is not None else None
    decision = scaledown.decide(
        scaledown.Inputs(
            relay=name,
            namespace=namespace,
            desired=spec.replicas,
            live_replicas=int(live) if live is not None else None,
            pods=frozenset(pods),
            reports={r.pod: r for r in reports},
            claims=claims,
            jobs=jobs,
            previous=(owner.get("status") or {}).get("scaleDown"),
            drain_timeout=spec.scale_down.drain_timeout,
            removed_claims=spec.scale_down.removed_claims,
            now=context.now,
            cluster_domain=context.cluster_domain,
        )
    )
    return decision, reports


_PROBE_THREADS = 16


def _probe_pods(pods: Sequence[Mapping[str, Any]], probe: QueueProbe | None, port: int) -> list[QueueReport]:
    """Every pod's GET /queue, asked in parallel: a pod that does not answer costs its timeout
    once, not once per pod behind it. In the order of `pods`."""

    def ask(pod: Mapping[str, Any]) -> QueueReport:
        name = str(pod["metadata"]["name"])
        ip = (pod.get("status") or {}).get("podIP")
        if probe is None:
            return QueueReport.failed(name, "the operator does not read pod queues")
        if not ip:
            return QueueReport.failed(name, "the pod has no IP yet")
        return probe(name, str(ip), port)

    if len(pods) <= 1:
        return [ask(pod) for pod in pods]
    with ThreadPoolExecutor(max_workers=min(_PROBE_THREADS, len(pods))) as pool:
        return list(pool.map(ask, pods))


def _job_state(job: Mapping[str, Any]) -> scaledown.JobState:
    status = job.get("status") or {}
    for entry in status.get("conditions") or []:
        if entry.get("status") == "True" and entry.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded"
        if entry.get("status") == "True" and entry.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    return "succeeded" if int(status.get("succeeded") or 0) > 0 else "running"


def _ensure_handoff_secret(api: KubeApi, owner: JSON, plan: RelayPlan, applied: _Applied) -> None:
    """Create the relay's hand-off Secret once; an existing one is kept as it is (its
    credential is what the running pods hold), one owned by someone else is a conflict."""
    namespace = plan.relay.key.namespace
    name = naming.handoff_secret_name(plan.relay.key.name)
    subject = ObjectRef(naming.MAILRELAY_KIND, namespace, plan.relay.key.name)
    live = api.get(SECRETS, namespace, name)
    if live is not None:
        if not _controlled_by(live, owner):
            applied.problems.append(
                Problem(subject, "ObjectConflict", _conflict_message(f"Secret {name}", live))
            )
        return
    manifest = builders.build_handoff_secret(
        plan, secrets.token_urlsafe(32), owners=[builders.owner_reference(owner)]
    )
    try:
        api.create(SECRETS, namespace, manifest)
    except AlreadyExists:
        return
    except (Forbidden, Invalid) as exc:
        message = f"Secret {name}: the API server refused the write: {exc}"
        applied.problems.append(Problem(subject, "ApiRejected", message))
        applied.retry.append(message)
        return
    applied.changes.append(f"created Secret {name}")


def _apply_scale_down(
    api: KubeApi,
    owner: JSON,
    plan: RelayPlan,
    options: builders.BuildOptions,
    decision: scaledown.Decision,
    applied: _Applied,
) -> None:
    """Delete the claims verified empty (by uid) and start the drain Jobs the decision asks for."""
    namespace = plan.relay.key.namespace
    subject = ObjectRef(naming.MAILRELAY_KIND, namespace, plan.relay.key.name)
    for claim in decision.delete_claims:
        try:
            api.delete(PERSISTENTVOLUMECLAIMS, namespace, claim.name, preconditions={"uid": claim.uid})
        except Conflict:
            continue  # another claim of that name now: it was not verified
        except Forbidden as exc:
            applied.problems.append(Problem(subject, "ApiRejected", f"deleting {claim.name}: {exc}"))
            continue
        applied.changes.append(f"deleted PersistentVolumeClaim {claim.name} (verified empty)")
    if decision.job_target is None:
        return
    owners = [builders.owner_reference(owner)]
    for claim in decision.start_jobs:
        job = builders.build_drain_job(
            plan, options, claim.ordinal, (claim.name, claim.uid), decision.job_target, owners
        )
        try:
            api.create(JOBS, namespace, job)
        except AlreadyExists:
            continue
        except (Forbidden, Invalid, NotFound) as exc:
            message = f"Job {job['metadata']['name']}: the API server refused the write: {exc}"
            applied.problems.append(Problem(subject, "ApiRejected", message))
            applied.retry.append(message)
            continue
        applied.changes.append(f"created Job {job['metadata']['name']} to drain {claim.name}")


# --------------------------------------------------------------------------- children


def _controlled_by(child: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = owner["metadata"]["uid"]
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in (child.get("metadata") or {}).get("ownerReferences") or []
    )


def _controller(child: Mapping[str, Any]) -> Mapping[str, Any] | None:
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


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
    meta = desired["metadata"]
    managed = {key: sorted(meta.get(key) or {}) for key in ("annotations", "labels")}
    annotations = meta.setdefault("annotations", {})
    annotations[APPLIED_HASH_ANNOTATION] = digest
    annotations[MANAGED_METADATA_ANNOTATION] = json.dumps(managed, sort_keys=True, separators=(",", ":"))
    return desired, digest


def _managed_keys(meta: Mapping[str, Any]) -> dict[str, set[str]]:
    """The label and annotation keys the operator set on this object the last time it wrote it."""
    raw = (meta.get("annotations") or {}).get(MANAGED_METADATA_ANNOTATION)
    try:
        recorded = json.loads(raw) if raw else {}
    except ValueError:
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    return {
        key: {k for k in recorded.get(key) or [] if isinstance(k, str)} for key in ("annotations", "labels")
    }


def _merge_live(desired: JSON, live: Mapping[str, Any]) -> tuple[JSON, list[str]]:
    """The body to PUT: desired, plus what must survive from live (resourceVersion, labels and
    annotations others set, StatefulSet immutable fields). Returns it and the immutable fields
    whose desired value could not be applied."""
    body = copy.deepcopy(desired)
    live_meta = live.get("metadata") or {}
    meta = body["metadata"]
    meta["resourceVersion"] = live_meta.get("resourceVersion")
    ours = _managed_keys(live_meta)
    for key in ("labels", "annotations"):
        foreign = {k: v for k, v in (live_meta.get(key) or {}).items() if k not in ours[key]}
        merged = {**foreign, **(meta.get(key) or {})}
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
    api: KubeApi,
    owner: JSON,
    plan: RelayPlan,
    options: builders.BuildOptions,
    drain: builders.Drain | None = None,
    applied: _Applied | None = None,
) -> _Applied:
    """Create or replace every child; a write the server refuses is recorded, not raised."""
    applied = applied if applied is not None else _Applied()
    subject = ObjectRef(naming.MAILRELAY_KIND, plan.relay.key.namespace, plan.relay.key.name)
    owners = [builders.owner_reference(owner)]
    for manifest in builders.build_objects(plan, options, owners=owners, drain=drain):
        label = f"{manifest['kind']} {manifest['metadata']['name']}"
        try:
            _apply(api, owner, manifest, subject, applied)
        except (Forbidden, Invalid) as exc:
            message = f"{label}: the API server refused the write: {exc}"
            applied.problems.append(Problem(subject, "ApiRejected", message))
            applied.retry.append(message)
    return applied


def _conflict_message(label: str, live: Mapping[str, Any]) -> str:
    controller = _controller(live)
    if controller is not None:
        return (
            f"{label} exists and is controlled by {controller.get('kind')} {controller.get('name')}; "
            "delete or rename it"
        )
    managed = (live["metadata"].get("labels") or {}).get(naming.LABEL_MANAGED_BY) == naming.MANAGED_BY
    if managed:
        return (
            f"{label} exists without an owner (left behind by a MailRelay deleted with its children "
            "orphaned?); delete it and the operator creates it again"
        )
    return f"{label} exists and is not managed by this MailRelay; delete or rename it"


def _apply(
    api: KubeApi, owner: JSON, manifest: Mapping[str, Any], subject: ObjectRef, applied: _Applied
) -> None:
    resource = resource_for(manifest["apiVersion"], manifest["kind"])
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    label = f"{manifest['kind']} {name}"
    desired, digest = _with_hash(manifest)
    for attempt in range(2):
        live = api.get(resource, namespace, name)
        if live is None:
            api.create(resource, namespace, desired)
            applied.changes.append(f"created {label}")
            return
        if not _controlled_by(live, owner):
            applied.problems.append(Problem(subject, "ObjectConflict", _conflict_message(label, live)))
            return
        if _deleting(live):
            message = f"{label} is being deleted; the operator creates it again once it is gone"
            applied.problems.append(Problem(subject, "Recreating", message, severity="warning"))
            applied.retry.append(message)
            return
        body, blocked = _merge_live(desired, live)
        if "volumeClaimTemplates" in blocked:
            blocked.remove("volumeClaimTemplates")
            if _change_volume_claims(api, live, desired, subject, applied):
                return
        for key in blocked:
            applied.problems.append(
                Problem(
                    subject,
                    "ImmutableField",
                    f"{label}: spec.{key} cannot change on an existing StatefulSet (live "
                    f"{json.dumps(live['spec'][key], sort_keys=True)}, wanted "
                    f"{json.dumps(desired['spec'].get(key), sort_keys=True)}); delete the StatefulSet with "
                    "--cascade=orphan to let the operator recreate it (spool volumes stay)",
                )
            )
        same_hash = (live["metadata"].get("annotations") or {}).get(APPLIED_HASH_ANNOTATION) == digest
        if same_hash and contains(live, _without_status(body)):
            return
        try:
            api.replace(resource, namespace, name, body)
        except Conflict:
            if attempt == 0:
                continue
            raise
        applied.changes.append(f"updated {label}")
        return


def _without_status(body: Mapping[str, Any]) -> JSON:
    result = dict(body)
    result.pop("status", None)
    result["metadata"] = {k: v for k, v in body["metadata"].items() if k != "resourceVersion"}
    return result


# --------------------------------------------------------------------------- spool volumes


def _spool_template(statefulset: Mapping[str, Any]) -> Mapping[str, Any]:
    templates = (statefulset.get("spec") or {}).get("volumeClaimTemplates") or []
    found = next((t for t in templates if (t.get("metadata") or {}).get("name") == naming.SPOOL_VOLUME), None)
    return (found or {}).get("spec") or {}


def _requested(claim_spec: Mapping[str, Any]) -> tuple[str, Decimal]:
    raw = ((claim_spec.get("resources") or {}).get("requests") or {}).get("storage", "0")
    return str(raw), quantity_value(raw) or Decimal(0)


def _class_label(name: str | None) -> str:
    return f"StorageClass {name}" if name else "the cluster's default StorageClass"


def _change_volume_claims(
    api: KubeApi, live: Mapping[str, Any], desired: Mapping[str, Any], subject: ObjectRef, applied: _Applied
) -> bool:
    """Apply a new spool claim template to a live StatefulSet: grow the existing claims, then
    delete the StatefulSet orphaning its pods (True: it is recreated on a later pass). What cannot
    be done is recorded as a lasting problem and the live template stays (False)."""
    namespace, name = live["metadata"]["namespace"], live["metadata"]["name"]
    live_spec, wanted_spec = _spool_template(live), _spool_template(desired)
    live_class, wanted_class = live_spec.get("storageClassName"), wanted_spec.get("storageClassName")
    (live_text, live_size), (wanted_text, wanted_size) = _requested(live_spec), _requested(wanted_spec)
    if live_class != wanted_class:
        applied.problems.append(
            Problem(
                subject,
                "StorageClassChange",
                f"the spool volumes of StatefulSet {name} use {_class_label(live_class)}; the spec asks for "
                f"{_class_label(wanted_class)}: an existing claim cannot change its class (set "
                "queue.storage.storageClassName back, or move the queue to a new MailRelay)",
            )
        )
        return False
    if wanted_size < live_size:
        applied.problems.append(
            Problem(
                subject,
                "StorageShrink",
                f"the spool volumes of StatefulSet {name} cannot shrink: they hold {live_text} each, the "
                f"spec asks for {wanted_text} (set queue.storage.size to {live_text} or more)",
            )
        )
        return False
    pattern = re.compile(rf"^{re.escape(naming.SPOOL_VOLUME)}-{re.escape(name)}-[0-9]+$")
    relay = subject.name
    claims = [
        claim
        for claim in api.list(PERSISTENTVOLUMECLAIMS, namespace, naming.selector_string(relay))
        if pattern.match(claim["metadata"]["name"])
    ]
    smaller = [claim for claim in claims if _requested(claim.get("spec") or {})[1] < wanted_size]
    expandable: dict[str, bool] = {}
    refused: list[str] = []
    for claim in smaller:
        class_name = (claim.get("spec") or {}).get("storageClassName") or ""
        if class_name not in expandable:
            storage_class = api.get(STORAGECLASSES, None, class_name) if class_name else None
            expandable[class_name] = bool((storage_class or {}).get("allowVolumeExpansion"))
        if not expandable[class_name]:
            refused.append(
                f"{claim['metadata']['name']} ({_requested(claim['spec'])[0]}, "
                f"{'StorageClass ' + class_name if class_name else 'no StorageClass'})"
            )
    if refused:
        applied.problems.append(
            Problem(
                subject,
                "StorageNotExpandable",
                f"the spool volumes cannot grow from {live_text} to {wanted_text}: the StorageClass of "
                f"{', '.join(refused)} does not allow volume expansion (allowVolumeExpansion); set "
                f"queue.storage.size back to {live_text}",
            )
        )
        return False
    for claim in smaller:
        patch = {"spec": {"resources": {"requests": {"storage": wanted_text}}}}
        api.merge_patch(PERSISTENTVOLUMECLAIMS, namespace, claim["metadata"]["name"], patch)
        applied.changes.append(f"resized PersistentVolumeClaim {claim['metadata']['name']} to {wanted_text}")
    preconditions = {"uid": live["metadata"]["uid"], "resourceVersion": live["metadata"]["resourceVersion"]}
    api.delete(STATEFULSETS, namespace, name, propagation="Orphan", preconditions=preconditions)
    message = f"StatefulSet {name} is recreated with the new spool claim template; its pods keep running"
    applied.changes.append(f"deleted StatefulSet {name} with its pods orphaned, to recreate it")
    applied.problems.append(Problem(subject, "Recreating", message, severity="warning"))
    applied.retry.append(message)
    return True


# --------------------------------------------------------------------------- RelayRoutes


def _reconcile_routes(api: KubeApi, route_bodies: Sequence[JSON], plan: NamespacePlan, now: datetime) -> None:
    for body in route_bodies:
        route_plan = plan.routes.get(body["metadata"]["name"])
        if route_plan is None:
            continue
        namespace = body["metadata"].get("namespace", plan.namespace)
        route = route_plan.route
        records = dkim_records(route, _secret_keys(api, namespace)) if route and route.spec.dkim else []
        status = conditions.relayroute_status(
            route_plan, previous=body.get("status") or {}, now=now, dkim=records
        )
        _write_status(api, RELAYROUTES, body, namespace, status, _ROUTE_ANNOUNCED)
