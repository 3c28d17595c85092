"""An in-memory emulation of the Kubernetes API over real HTTP, for the operator's tests.

No kube-apiserver can be installed here (NOTES.md), so the operator's end-to-end tests run the
real kopf operator and the real `kubernetes` client against this server on 127.0.0.1. It is test
code, but it must be honest: where it accepts a request, the answer has the shape and the
semantics a real API server of the emulated version gives, and where it does not emulate something it refuses
loudly instead of pretending.

Why not a subclass of kmock 0.8's emulator: the trial in NOTES.md replaced its whole state machine
(resourceVersion, uid, status subresource, GC, selectors, 201s) and leaned on private hooks and a
response object that is mutated per request; an aiohttp app of the same size owns its semantics.

What it emulates (each is checked in test_emulator.py):
- discovery (/api, /apis, group and resource lists with verbs, kinds, subresources, short names,
  categories) for the built-in kinds the operator touches and for every CRD created in it, and
  /version for the Kubernetes version given (`version`, default 1.30);
- objects with uid, creationTimestamp, a cluster-wide monotonic resourceVersion that changes on
  every write and only then (a no-op update changes nothing and sends no watch event), and
  generation bumped only when something outside metadata and status changes;
- create (201; 409 AlreadyExists; generateName; the namespace must exist and not be
  terminating), get, list (with kind, resourceVersion, label and field selectors, and pages:
  `limit`, `continue`, `remainingItemCount`; a continue token older than the last compaction is
  410 Expired), PUT (optimistic concurrency on resourceVersion), JSON merge patch (RFC 7386),
  JSON patch (RFC 6902, `test` included), delete (uid/resourceVersion preconditions, 409 when
  they do not hold; finalizers and deletionTimestamp; 202 while something holds it),
  deletecollection;
- the /status subresource (writes there change only status; writes to the main resource keep the
  stored status) and the /scale subresource (autoscaling/v1 Scale over spec.replicas) for
  resources that declare them (StatefulSets; CRDs through `subresources.scale`);
- watch with ADDED/MODIFIED/DELETED, resumed from a resourceVersion (410 Gone when compacted),
  label/field selectors applied per event (an object leaving the selector is DELETED for that
  watcher), `timeoutSeconds`; `expire_watches()` ends open watches with an ERROR 410 event;
- garbage collection by ownerReferences (owner uid must match): when an owner goes, dependents
  whose owners are all gone are deleted (background propagation); `Orphan` sets the orphan
  finalizer, cuts the dependents' references, then lets the owner go; `Foreground` sets
  foregroundDeletion, deletes the dependents and lets the owner go once none is left; a
  dependent created with an owner reference that resolves to nothing is collected too;
- namespace deletion as the namespace controller does it: Terminating with spec.finalizers
  ["kubernetes"], every object in it deleted (their finalizers honoured), the namespace gone
  once it is empty; CRD deletion as apiextensions does it: the cleanup finalizer, every custom
  resource deleted (finalizers honoured), no new ones (405), the CRD gone once none is left;
- custom resources are defaulted, pruned and validated against the CRD's openAPIV3Schema
  (422 Invalid), like a structural schema on a real server;
- what a server refuses for every object: names (DNS subdomains; DNS labels for Services and
  Namespaces), label keys and values, annotation keys and size; and for built-in kinds the
  OpenAPI schema of the emulated version through kubernetes-validate (required fields and
  types; 422 with the path);
- per kind: a Secret's write-only stringData is merged into data (base64); StatefulSet spec
  fields other than replicas, template, updateStrategy, ... are
  immutable (422), quantities of containers and claim templates are stored in canonical form
  ("0.5" -> "500m"), and below 1.27 persistentVolumeClaimRetentionPolicy is dropped (the
  StatefulSetAutoDeletePVC gate is off there); Services get defaults, a cluster IP and node
  ports, kept when an update leaves them out and immutable once set; PersistentVolumeClaims
  get the default StorageClass (DefaultStorageClass admission), and their spec is immutable but
  for a bigger storage request, which needs a StorageClass with allowVolumeExpansion
  (PersistentVolumeClaimResize admission, 403) and never a smaller one (422);
- bearer-token authentication (401) and RBAC authorization per verb and resource (403) for the
  tokens given rules, so the operator can run with exactly the chart's ClusterRole, and the
  OwnerReferencesPermissionEnforcement admission plugin for those tokens (changing an object's
  ownerReferences needs `delete` on it; setting blockOwnerDeletion needs `update` on the
  owner's `finalizers` subresource);
- controllers (k8s_controllers, on unless `controllers=False`): a StatefulSet controller that
  makes pods and claims from the template, rolls revisions and writes status as the real one
  does (zero counts omitted), a kubelet that makes new pods Ready (not in
  `unready_namespaces`; each pod gets an IP of its own in 127.244.0.0/16, on loopback, so that
  anything reading a pod's endpoints never leaves this machine), a provisioner and resizer for
  claims; no Job controller (a test that needs a Job run plays it); `unmanaged_namespaces` opts a
  namespace out, for tests that write StatefulSet status themselves.

What it does not model. Refused with an error: server-side apply and strategic merge patch (415).
Silently different from a server (a test must not rely on them): CEL `x-kubernetes-validations`
are not evaluated (the CRD tests evaluate them with cel-python); built-in kinds get no validation
beyond their OpenAPI schema (e.g. a Service without ports, container port ranges, pod spec
immutability) and their unknown fields are kept, neither pruned nor refused, whatever
`fieldValidation` asks; a paged list is not a snapshot (later pages show objects as they are
now). Absent: watch bookmarks, `sendInitialEvents`,
`allowWatchBookmarks`; admission webhooks and admission plugins other than the three named
above (no quota, no LimitRanger, no PodSecurity); RBAC bindings (a token's rules apply in every
namespace, like a ClusterRoleBinding), aggregation and `resourceNames` beyond exact names;
Foreground deletion waits for every dependent, not only those with blockOwnerDeletion;
controllers other than those above (no Deployment, ReplicaSet, endpoints, events TTL, leases,
scheduling, nodes, ControllerRevision objects, pod grace periods).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import decimal
import json
import random
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import yaml
from aiohttp import web

JSON = dict[str, Any]

CRD_GROUP = "apiextensions.k8s.io"
CRD_KEY = (CRD_GROUP, "customresourcedefinitions")
NAMESPACE_KEY = ("", "namespaces")
CRD_CLEANUP = "customresourcecleanup.apiextensions.k8s.io"  # the finalizer of every CRD
# Finalizers the garbage collector sets and removes for the Orphan and Foreground policies.
POLICY_FINALIZERS = {"Orphan": "orphan", "Foreground": "foregroundDeletion"}
STATEFULSET_MUTABLE = frozenset(
    (
        "replicas",
        "ordinals",
        "template",
        "updateStrategy",
        "persistentVolumeClaimRetentionPolicy",
        "minReadySeconds",
        "revisionHistoryLimit",
    )
)


# --------------------------------------------------------------------------- resource types


@dataclass(frozen=True)
class ScalePaths:
    """Where the /scale subresource reads and writes (CRD `subresources.scale` semantics)."""

    spec_replicas: str = ".spec.replicas"
    status_replicas: str = ".status.replicas"
    label_selector: str | None = ".status.selector"


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    status: bool = False
    scale: ScalePaths | None = None
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    schema: Mapping[str, Any] | None = None  # openAPIV3Schema, custom resources only

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)


VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

BUILTIN_TYPES = [
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, status=True, short_names=("ns",)),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "services", "Service", status=True, short_names=("svc",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType("", "v1", "pods", "Pod", status=True, short_names=("po",)),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", status=True),
    ResourceType("", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    ResourceType(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        status=True,
        scale=ScalePaths(label_selector=None),
        short_names=("sts",),
    ),
    ResourceType(
        "apps", "v1", "deployments", "Deployment", status=True, scale=ScalePaths(label_selector=None)
    ),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", status=True),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
    ResourceType("batch", "v1", "jobs", "Job", status=True),
    ResourceType(
        "storage.k8s.io", "v1", "storageclasses", "StorageClass", namespaced=False, short_names=("sc",)
    ),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType(
        CRD_GROUP, "v1", "customresourcedefinitions", "CustomResourceDefinition", False, status=True
    ),
]


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """Answered as a metav1.Status with this HTTP code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> JSON:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{rt.plural}{"." + rt.group if rt.group else ""} "{name}" not found',
        {"name": name, "group": rt.group, "kind": rt.plural},
    )


def _invalid(rt: ResourceType, name: str, causes: list[str]) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'{rt.kind}.{rt.group or "core"} "{name}" is invalid: ' + "; ".join(causes),
        {"name": name, "group": rt.group, "kind": rt.kind, "causes": [{"message": c} for c in causes]},
    )


# --------------------------------------------------------------------------- selectors

_SET_EXPR = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def parse_label_selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """A predicate over labels from the string form of a label selector (equality and set based)."""
    tests: list[Callable[[Mapping[str, str]], bool]] = []
    for raw in _split_selector(text or ""):
        term = raw.strip()
        if match := _SET_EXPR.match(term):
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if op == "in":
                tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            tests.append(lambda labels, k=absent: k not in labels)
        elif re.fullmatch(r"[\w./-]+", term):
            tests.append(lambda labels, k=term: k in labels)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return lambda labels: all(test(labels) for test in tests)


def _dotted(obj: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)
    return obj


def parse_field_selector(text: str) -> Callable[[JSON], bool]:
    """Equality field selectors over dotted paths (`metadata.name=x`, `involvedObject.uid!=y`)."""
    tests: list[Callable[[JSON], bool]] = []
    for raw in (text or "").split(","):
        term = raw.strip()
        if not term:
            continue
        negate = "!=" in term
        key, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
        if not key or not _:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")

        def test(obj: JSON, k: str = key.strip(), v: str = value.strip(), neg: bool = negate) -> bool:
            found = _dotted(obj, k)
            actual = "" if found is None else str(found)
            return (actual != v) if neg else (actual == v)

        tests.append(test)
    return lambda obj: all(test(obj) for test in tests)


# --------------------------------------------------------------------------- patches and schemas


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural) → JSON Schema draft 4 for the `jsonschema` validator."""
    if isinstance(schema, list):
        return [_to_jsonschema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: JSON = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format", "default", "example"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: _to_jsonschema(v) for k, v in value.items()}
        else:
            out[key] = _to_jsonschema(value)
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """Structural defaulting: fill `default` for absent properties of objects that exist."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key in list(value):
                if key not in props:
                    value[key] = apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def prune(value: Any, schema: Mapping[str, Any], root: bool = False) -> Any:
    """Structural pruning: drop fields the schema does not know (x-kubernetes-preserve-unknown-fields
    keeps them), as a real server does for custom resources."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
            return value
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        result = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                result[key] = item
            elif key in props:
                result[key] = prune(item, props[key])
            elif isinstance(extra, Mapping):
                result[key] = prune(item, extra)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                result[key] = item
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(item, schema["items"]) for item in value]
    return value


# --------------------------------------------------------------------------- the store


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server uses for generateName
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# Kinds whose names are DNS labels, not subdomains (they become DNS names themselves).
_LABEL_NAMED = {
    ("", "services"): re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$"),  # DNS-1035
    ("", "namespaces"): re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),  # DNS-1123 label
}
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _qualified_name_problem(key: str) -> str | None:
    """Why `key` is not a label or annotation key (apimachinery IsQualifiedName), or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in prefix:
        return "a qualified name has at most one '/'"
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_NAME.match(prefix)):
        return "the prefix part must be a lowercase RFC 1123 subdomain"
    if not name or len(name) > 63 or not _LABEL_VALUE.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
            "with an alphanumeric character (at most 63)"
        )
    return None


@dataclass
class WatchEvent:
    rv: int
    key: tuple[str, str]
    type: str
    obj: JSON
    old: JSON | None


_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$"
)
_BINARY = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_DECIMAL = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E"}


def canonical_quantity(value: Any) -> Any:
    """A resource quantity the way the API server stores it (k8s.io/apimachinery Quantity's
    canonical form): "0.5" -> "500m", "1024Mi" -> "1Gi", "1.5Gi" -> "1536Mi", "1000" -> "1k",
    "1e3" -> "1e3". Binary suffixes stay binary while the amount is a whole number of at least 1Ki;
    everything else is a decimal mantissa with the largest exponent (a multiple of 3) that keeps it
    whole. Values that are not quantities come back unchanged (validation is not emulated)."""
    match = (
        _QUANTITY.match(str(value)) if isinstance(value, int | str) and not isinstance(value, bool) else None
    )
    if match is None:
        return value
    number, exponent, suffix = match.groups()
    amount = decimal.Decimal(number) * (
        decimal.Decimal(10) ** int(exponent[1:])
        if exponent
        else decimal.Decimal(1024) ** _BINARY.index(suffix)
        if suffix in _BINARY and suffix
        else decimal.Decimal(10) ** next((e for e, s in _DECIMAL.items() if s == (suffix or "")))
    )
    amount = amount.quantize(decimal.Decimal("1e-9"), rounding=decimal.ROUND_CEILING)
    if amount == 0:
        return "0"
    if suffix in _BINARY[1:] and amount == amount.to_integral_value() and abs(amount) >= 1024:
        power = 0
        while power < len(_BINARY) - 1 and amount % 1024 ** (power + 1) == 0:
            power += 1
        return f"{int(amount) // 1024**power}{_BINARY[power]}"
    exp = -9
    while (
        exp < 18
        and (amount / decimal.Decimal(10) ** (exp + 3))
        == (amount / decimal.Decimal(10) ** (exp + 3)).to_integral_value()
    ):
        exp += 3
    mantissa = int(amount / decimal.Decimal(10) ** exp)
    if exponent:
        return f"{mantissa}e{exp}" if exp else str(mantissa)
    return f"{mantissa}{_DECIMAL[exp]}"


def _quantity_amount(value: Any) -> decimal.Decimal:
    """The amount of a quantity, for comparisons (0 when it is none)."""
    canonical = canonical_quantity(value if value is not None else "0")
    match = _QUANTITY.match(str(canonical))
    if match is None:
        return decimal.Decimal(0)
    number, exponent, suffix = match.groups()
    if exponent:
        return decimal.Decimal(number) * decimal.Decimal(10) ** int(exponent[1:])
    if suffix in _BINARY[1:]:
        return decimal.Decimal(number) * decimal.Decimal(1024) ** _BINARY.index(suffix)
    scale = next(e for e, s in _DECIMAL.items() if s == (suffix or ""))
    return decimal.Decimal(number) * decimal.Decimal(10) ** scale


def canonicalize_pod_quantities(statefulset: JSON) -> None:
    """Resource quantities of a StatefulSet's containers and claim templates in canonical form."""
    spec = statefulset.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    holders = [c.get("resources") for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])]
    holders += [(t.get("spec") or {}).get("resources") for t in spec.get("volumeClaimTemplates") or []]
    for resources in holders:
        for key in ("requests", "limits"):
            amounts = (resources or {}).get(key)
            if isinstance(amounts, dict):
                for name, amount in amounts.items():
                    amounts[name] = canonical_quantity(amount)


@dataclass(eq=False)
class _Watcher:
    key: tuple[str, str]
    queue: asyncio.Queue[WatchEvent | None] = field(default_factory=asyncio.Queue)


ObjKey = tuple[str, str, str, str]  # group, plural, namespace ("" if cluster-scoped), name


class KubernetesApiEmulator:
    """The state and the HTTP handlers. Runs inside one event loop (see `EmulatorThread`)."""

    def __init__(
        self,
        token: str | None = None,
        grants: Mapping[str, list[JSON]] | None = None,
        *,
        version: str = "1.30",
        controllers: bool = True,
    ) -> None:
        # Authentication: with `token` or `grants`, a request needs "Authorization: Bearer <t>"
        # for a known t (401 otherwise). `token` may do anything; a token in `grants` only what
        # its RBAC PolicyRules allow, everywhere (a ClusterRole binding), else 403 Forbidden.
        self.token = token
        self.grants = dict(grants or {})
        # The Kubernetes minor version emulated: /version, the schemas built-in kinds are
        # validated against, and fields a server of that version drops.
        major, _, minor = version.partition(".")
        self.version = (int(major), int(minor))
        # The StatefulSet controller, kubelet and volume resizer stand-ins (k8s_controllers).
        self.controllers = controllers
        self.unmanaged_namespaces: set[str] = set()  # no StatefulSet controller acts here
        self.unready_namespaces: set[str] = set()  # the kubelet stand-in leaves pods unready here
        # Called with (method, path) before a write is processed: a test's concurrent writer.
        self.before_write: Callable[[str, str], None] | None = None
        self.calls: list[tuple[str, str, str, str]] = []  # (token, method, path, query string)
        self.usage: set[tuple[str, str, str, str]] = set()  # (token, apiGroup, resource, verb)
        self.denied: list[tuple[str, str, str, str]] = []
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.objects: dict[ObjKey, JSON] = {}
        self.history: list[WatchEvent] = []
        self.compacted_rv = 0
        self.watchers: set[_Watcher] = set()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content-type) for assertions
        self.bodies: list[tuple[str, bytes]] = []  # (user agent, body), index-aligned with requests
        self._rv = 1000
        self._gc_scheduled = False
        self._controllers_scheduled = False
        self._ips = 0
        for rt in BUILTIN_TYPES:
            self.register(rt)
        self._store(
            self.types[("", "v1", "namespaces")],
            {
                "metadata": {"name": "default"},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            },
        )

    # ------------------------------------------------------------------ registry

    def register(self, rt: ResourceType) -> None:
        self.types[(rt.group, rt.version, rt.plural)] = rt

    def type_for(self, api_version: str, kind: str) -> ResourceType | None:
        for rt in self.types.values():
            if rt.api_version == api_version and rt.kind == kind:
                return rt
        return None

    def _types_for_key(self, key: tuple[str, str]) -> list[ResourceType]:
        return [rt for rt in self.types.values() if rt.key == key]

    # ------------------------------------------------------------------ store primitives

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _notify(self, rt: ResourceType, type_: str, obj: JSON, old: JSON | None) -> None:
        event = WatchEvent(int(obj["metadata"]["resourceVersion"]), rt.key, type_, copy.deepcopy(obj), old)
        self.history.append(event)
        for watcher in self.watchers:
            if watcher.key == rt.key:
                watcher.queue.put_nowait(event)
        self._schedule_controllers()

    def _store(self, rt: ResourceType, obj: JSON) -> JSON:
        """Insert a new object (already validated), stamping server-owned metadata."""
        meta = obj.setdefault("metadata", {})
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta["resourceVersion"] = str(self._next_rv())
        for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(server_owned, None)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        if rt.key == CRD_KEY:
            meta["finalizers"] = [*(meta.get("finalizers") or []), CRD_CLEANUP]
        if rt.key == NAMESPACE_KEY:
            obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
            obj["status"] = {"phase": "Active"}
        if rt.key == ("batch", "jobs"):  # the generated selector (no manualSelector)
            generated = {
                "batch.kubernetes.io/controller-uid": meta["uid"],
                "batch.kubernetes.io/job-name": meta["name"],
            }
            spec = obj.setdefault("spec", {})
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": meta["uid"]}}
            template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
            template_meta["labels"] = {**(template_meta.get("labels") or {}), **generated}
        key = (rt.group, rt.plural, meta.get("namespace", "") if rt.namespaced else "", meta["name"])
        self.objects[key] = obj
        self._notify(rt, "ADDED", obj, None)
        if rt.key == (CRD_GROUP, "customresourcedefinitions"):
            self._establish_crd(obj)
        return obj

    def _replace(self, rt: ResourceType, key: ObjKey, new: JSON) -> JSON:
        """Write a changed object; no-ops keep the resourceVersion and send no event."""
        old = self.objects[key]
        if new == old:
            return old
        meta, old_meta = new["metadata"], old["metadata"]
        if _without(new, "metadata", "status") != _without(old, "metadata", "status"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = str(self._next_rv())
        self.objects[key] = new
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not _spec_finalizers(new):
            self._remove(rt, key)
            return new
        self._notify(rt, "MODIFIED", new, old)
        if meta.get("ownerReferences") != old_meta.get("ownerReferences"):
            self._schedule_gc()
        return new

    def _remove(self, rt: ResourceType, key: ObjKey) -> None:
        obj = self.objects.pop(key)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._notify(rt, "DELETED", obj, None)
        if rt.key == (CRD_GROUP, "customresourcedefinitions"):
            self._forget_crd(obj)
        if rt.key == ("", "namespaces"):
            for other in [k for k in self.objects if k[2] == key[3] and self._rt_of(k).namespaced]:
                if other in self.objects:
                    self._delete(self._rt_of(other), other, "Background")
        self._schedule_gc()

    def _rt_of(self, key: ObjKey) -> ResourceType:
        return self._types_for_key((key[0], key[1]))[0]

    def _delete(
        self, rt: ResourceType, key: ObjKey, propagation: str, preconditions: Mapping[str, Any] | None = None
    ) -> tuple[JSON, bool]:
        """Delete or mark for deletion (finalizers, the Orphan and Foreground policies, a
        namespace's or a CRD's finalization). Returns (object, gone now)."""
        obj = self.objects[key]
        meta = obj["metadata"]
        for field_name in ("uid", "resourceVersion"):
            wanted = (preconditions or {}).get(field_name)
            if wanted and wanted != meta.get(field_name):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {field_name} in precondition: {wanted}, "
                    f"{field_name} in object meta: {meta.get(field_name)}",
                    {"name": key[3], "group": rt.group, "kind": rt.plural},
                )
        finalizers = list(meta.get("finalizers") or [])
        policy = POLICY_FINALIZERS.get(propagation)
        if policy and not meta.get("deletionTimestamp") and policy not in finalizers:
            finalizers.append(policy)
        if finalizers or _spec_finalizers(obj):
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                if finalizers:
                    new["metadata"]["finalizers"] = finalizers
                if rt.key == NAMESPACE_KEY:
                    new["status"] = {"phase": "Terminating"}
                self._replace(rt, key, new)
                self._schedule_gc()
            return self.objects.get(key, obj), False
        self._remove(rt, key)
        return obj, True

    # ------------------------------------------------------------------ garbage collection

    def _schedule_gc(self) -> None:
        if not self._gc_scheduled:
            self._gc_scheduled = True
            asyncio.get_running_loop().call_soon(self._collect_garbage)

    def _orphan_dependents(self, uid: str) -> None:
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid] or None
                if new["metadata"]["ownerReferences"] is None:
                    del new["metadata"]["ownerReferences"]
                self._replace(self._rt_of(key), key, new)

    def _owner_exists(self, ref: Mapping[str, Any], namespace: str) -> bool:
        group = ref.get("apiVersion", "").rpartition("/")[0]
        for (g, _plural, ns, name), obj in self.objects.items():
            if g != group or name != ref.get("name") or obj.get("kind") != ref.get("kind"):
                continue
            if ns not in ("", namespace):  # cross-namespace owners are invalid
                continue
            if obj["metadata"].get("uid") == ref.get("uid"):
                return True
        return False

    def _dependents(self, uid: str) -> list[ObjKey]:
        return [
            key
            for key, obj in self.objects.items()
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _drop_finalizer(self, key: ObjKey, finalizer: str) -> None:
        new = copy.deepcopy(self.objects[key])
        new["metadata"]["finalizers"] = [f for f in new["metadata"].get("finalizers") or [] if f != finalizer]
        if not new["metadata"]["finalizers"]:
            del new["metadata"]["finalizers"]
        self._replace(self._rt_of(key), key, new)

    def _finish_policies(self) -> None:
        """The orphan finalizer: cut the dependents' references, then let the owner go. The
        foregroundDeletion finalizer: delete the dependents, and let the owner go once none is
        left."""
        for key, obj in list(self.objects.items()):
            meta = obj["metadata"]
            if key not in self.objects or not meta.get("deletionTimestamp"):
                continue
            finalizers = meta.get("finalizers") or []
            if "orphan" in finalizers:
                self._orphan_dependents(meta["uid"])
                self._drop_finalizer(key, "orphan")
            elif "foregroundDeletion" in finalizers:
                dependents = self._dependents(meta["uid"])
                for dependent in dependents:
                    if not self.objects[dependent]["metadata"].get("deletionTimestamp"):
                        self._delete(self._rt_of(dependent), dependent, "Foreground")
                if not self._dependents(meta["uid"]):
                    self._drop_finalizer(key, "foregroundDeletion")

    def _collect_garbage(self) -> None:
        """Background propagation: delete dependents none of whose owners exist (by uid)."""
        self._gc_scheduled = False
        self._finish_policies()
        changed = True
        while changed:
            changed = False
            for key, obj in list(self.objects.items()):
                if key not in self.objects:
                    continue
                refs = obj["metadata"].get("ownerReferences") or []
                if not refs or obj["metadata"].get("deletionTimestamp"):
                    continue
                if not any(self._owner_exists(ref, key[2]) for ref in refs):
                    self._delete(self._rt_of(key), key, "Background")
                    changed = True

    # ------------------------------------------------------------------ controllers

    def _schedule_controllers(self) -> None:
        if self._controllers_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # constructing, outside the loop: the first write in it schedules
            return
        self._controllers_scheduled = True
        loop.call_soon(self._run_controllers)

    def _run_controllers(self) -> None:
        """One round of the controllers, each a level-triggered step that writes only what
        differs (so rounds end): namespace and CRD finalization, then k8s_controllers."""
        self._controllers_scheduled = False
        self._finalize_namespaces()
        self._finalize_crds()
        if self.controllers:
            from tests.relay_operator import k8s_controllers

            k8s_controllers.run(self)

    def _finalize_namespaces(self) -> None:
        """The namespace controller: a Terminating namespace's objects are deleted (their
        finalizers are honoured); once none is left its "kubernetes" finalizer goes, then it."""
        for key, ns in list(self.objects.items()):
            if (key[0], key[1]) != NAMESPACE_KEY or not ns["metadata"].get("deletionTimestamp"):
                continue
            content = [k for k in self.objects if k[2] == key[3] and self._rt_of(k).namespaced]
            for item in content:
                if item in self.objects and not self.objects[item]["metadata"].get("deletionTimestamp"):
                    self._delete(self._rt_of(item), item, "Background")
            if not any(k[2] == key[3] and self._rt_of(k).namespaced for k in self.objects):
                new = copy.deepcopy(ns)
                new["spec"]["finalizers"] = [f for f in _spec_finalizers(ns) if f != "kubernetes"]
                self._replace(self._rt_of(key), key, new)

    def _finalize_crds(self) -> None:
        """The apiextensions finalizer: a deleted CRD's custom resources are deleted (their
        finalizers are honoured); once none is left its cleanup finalizer goes, then it."""
        for key, crd in list(self.objects.items()):
            if (key[0], key[1]) != CRD_KEY or not crd["metadata"].get("deletionTimestamp"):
                continue
            spec = crd.get("spec") or {}
            kind = (spec.get("group"), (spec.get("names") or {}).get("plural"))
            instances = [k for k in self.objects if (k[0], k[1]) == kind]
            for item in instances:
                if not self.objects[item]["metadata"].get("deletionTimestamp"):
                    self._delete(self._rt_of(item), item, "Background")
            if not any((k[0], k[1]) == kind for k in self.objects) and CRD_CLEANUP in (
                crd["metadata"].get("finalizers") or []
            ):
                self._drop_finalizer(key, CRD_CLEANUP)

    def _terminating(self, key: ObjKey) -> bool:
        obj = self.objects.get(key)
        return bool(obj and obj["metadata"].get("deletionTimestamp"))

    # ------------------------------------------------------------------ CRDs

    def _establish_crd(self, crd: JSON) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            subresources = version.get("subresources") or {}
            scale = subresources.get("scale")
            self.register(
                ResourceType(
                    group=spec["group"],
                    version=version["name"],
                    plural=names["plural"],
                    kind=names["kind"],
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    singular=names.get("singular", names["kind"].lower()),
                    status="status" in subresources,
                    scale=None
                    if scale is None
                    else ScalePaths(
                        scale["specReplicasPath"], scale["statusReplicasPath"], scale.get("labelSelectorPath")
                    ),
                    short_names=tuple(names.get("shortNames", [])),
                    categories=tuple(names.get("categories", [])),
                    schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                )
            )
        crd["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
            "conditions": [
                {"type": t, "status": "True", "reason": r, "lastTransitionTime": _now(), "message": ""}
                for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
            ],
        }

    def _crd_terminating(self, rt: ResourceType) -> bool:
        return any(
            (key[0], key[1]) == CRD_KEY
            and (obj.get("spec") or {}).get("group") == rt.group
            and ((obj.get("spec") or {}).get("names") or {}).get("plural") == rt.plural
            and obj["metadata"].get("deletionTimestamp")
            for key, obj in self.objects.items()
        )

    def _forget_crd(self, crd: JSON) -> None:
        spec = crd.get("spec", {})
        plural = spec.get("names", {}).get("plural")
        for key in [k for k in self.objects if (k[0], k[1]) == (spec.get("group"), plural)]:
            self.objects.pop(key, None)
        for tkey in [k for k in self.types if (k[0], k[2]) == (spec.get("group"), plural)]:
            del self.types[tkey]

    def load_crds(self, directory: Path) -> list[str]:
        """Create every CRD document found in the YAML files of `directory` (not recursive)."""
        names = []
        for path in sorted(directory.glob("*.y*ml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    rt = self.types[(CRD_GROUP, "v1", "customresourcedefinitions")]
                    self._create(rt, "", doc)
                    names.append(doc["metadata"]["name"])
        return names

    # ------------------------------------------------------------------ validation of writes

    def _check_custom(self, rt: ResourceType, obj: JSON) -> JSON:
        if rt.schema is None:
            return obj
        obj = prune(apply_defaults(obj, rt.schema), rt.schema, root=True)
        validator = jsonschema.Draft4Validator(_to_jsonschema(rt.schema))
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            causes = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
            raise _invalid(rt, obj.get("metadata", {}).get("name", ""), causes)
        return obj

    def _check_metadata(self, rt: ResourceType, obj: JSON) -> None:
        meta = obj.get("metadata")
        name = meta.get("name", "") if isinstance(meta, dict) else ""
        if not isinstance(meta, dict):
            raise _invalid(rt, name, ["metadata: Required value"])
        if not name or not _DNS_NAME.match(name) or len(name) > 253:
            raise _invalid(
                rt, name, [f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain"]
            )
        if rt.key in _LABEL_NAMED and (len(name) > 63 or not _LABEL_NAMED[rt.key].match(name)):
            raise _invalid(
                rt, name, [f"metadata.name: Invalid value: {name!r}: a {rt.kind} name must be a DNS label"]
            )
        for label_map in ("labels", "annotations"):
            values = meta.get(label_map) or {}
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                raise _invalid(rt, name, [f"metadata.{label_map}: values must be strings"])
            causes = [
                f"metadata.{label_map}: Invalid value: {k!r}: {problem}"
                for k in values
                if (problem := _qualified_name_problem(k))
            ]
            if label_map == "labels":
                causes += [
                    f"metadata.labels: Invalid value: {v!r}: a label value must be 63 characters or less, "
                    "alphanumeric, '-', '_' or '.', starting and ending with an alphanumeric character"
                    for v in values.values()
                    if len(v) > 63 or (v and not _LABEL_VALUE.match(v))
                ]
            elif sum(len(k) + len(v) for k, v in values.items()) > 256 * 1024:
                causes.append("metadata.annotations: Too long: must have at most 262144 bytes")
            if causes:
                raise _invalid(rt, name, causes)
        for index, ref in enumerate(meta.get("ownerReferences") or []):
            missing = [f for f in ("apiVersion", "kind", "name", "uid") if not ref.get(f)]
            if missing:
                raise _invalid(
                    rt, name, [f"metadata.ownerReferences[{index}].{f}: Required value" for f in missing]
                )
        if obj.get("kind") not in (None, rt.kind) or obj.get("apiVersion") not in (None, rt.api_version):
            raise ApiError(
                400,
                "BadRequest",
                f"the API version/kind in the body ({obj.get('apiVersion')}/{obj.get('kind')}) "
                f"does not match the URL ({rt.api_version}/{rt.kind})",
            )

    def _check_builtin(self, rt: ResourceType, obj: JSON, old: JSON | None) -> None:
        """What the server's typed decoding, defaulting and validation of a built-in kind do that
        the operator can meet: per-kind defaults and allocations, fields this version drops,
        immutable fields, and the OpenAPI schema of this version (required fields and types)."""
        name = obj["metadata"]["name"]
        if rt.key == ("apps", "statefulsets"):
            canonicalize_pod_quantities(obj)
            if self.version < (1, 27):  # StatefulSetAutoDeletePVC is off: the field is dropped
                (obj.get("spec") or {}).pop("persistentVolumeClaimRetentionPolicy", None)
            if old is not None:
                old_spec, new_spec = old.get("spec") or {}, obj.get("spec") or {}
                frozen = {k for k in set(old_spec) | set(new_spec) if k not in STATEFULSET_MUTABLE}
                if any(old_spec.get(k) != new_spec.get(k) for k in frozen):
                    raise _invalid(
                        rt,
                        name,
                        [
                            "spec: Forbidden: updates to statefulset spec for fields other than "
                            + ", ".join(f"'{k}'" for k in sorted(STATEFULSET_MUTABLE))
                            + " are forbidden"
                        ],
                    )
        elif rt.key == ("batch", "jobs"):
            self._job_rules(rt, obj, old)
        elif rt.key == ("", "secrets") and "stringData" in obj:
            # stringData is write-only: merged into data (base64), never stored or returned.
            string_data = obj.pop("stringData") or {}
            obj["data"] = {
                **(obj.get("data") or {}),
                **{k: base64.b64encode(str(v).encode()).decode() for k, v in string_data.items()},
            }
        elif rt.key == ("", "services"):
            self._service_allocations(rt, obj, old)
        elif rt.key == ("", "persistentvolumeclaims"):
            self._claim_rules(rt, obj, old)
        if rt not in BUILTIN_TYPES:
            return
        checked = {k: v for k, v in obj.items() if k != "status"}
        checked["apiVersion"], checked["kind"] = rt.api_version, rt.kind
        try:
            kubernetes_validate.validate(checked, f"{self.version[0]}.{self.version[1]}", strict=False)
        except kubernetes_validate.SchemaNotFoundError:
            return
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "<root>"
            raise _invalid(rt, name, [f"{where}: {exc.message}"]) from exc

    def _service_allocations(self, rt: ResourceType, obj: JSON, old: JSON | None) -> None:
        """Service defaults; a cluster IP and node ports allocated once and kept when an update
        leaves them out (the registry's patchAllocatedValues); a set cluster IP is immutable."""
        spec = obj.setdefault("spec", {})
        old_spec = (old or {}).get("spec") or {}
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        if spec["type"] == "ExternalName":
            return
        if not spec.get("clusterIP"):
            if old_spec.get("clusterIP"):
                spec["clusterIP"], spec["clusterIPs"] = old_spec["clusterIP"], old_spec.get("clusterIPs")
            else:
                self._ips += 1
                spec["clusterIP"] = f"10.96.{self._ips // 250}.{self._ips % 250 + 1}"
        if old_spec.get("clusterIP") and spec["clusterIP"] != old_spec["clusterIP"]:
            raise _invalid(
                rt,
                obj["metadata"]["name"],
                [f"spec.clusterIPs[0]: Invalid value: {spec['clusterIP']!r}: may not change once set"],
            )
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if spec["type"] in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
            before = {
                (p.get("port"), p.get("protocol")): p.get("nodePort") for p in old_spec.get("ports") or []
            }
            for port in spec.get("ports") or []:
                if isinstance(port, dict) and not port.get("nodePort"):
                    port["nodePort"] = (
                        before.get((port.get("port"), port.get("protocol"))) or self._node_port()
                    )
            if spec["type"] == "LoadBalancer" and spec["externalTrafficPolicy"] == "Local":
                spec.setdefault(
                    "healthCheckNodePort", old_spec.get("healthCheckNodePort") or self._node_port()
                )

    def _node_port(self) -> int:
        self._ips += 1
        return 30000 + self._ips % 2768

    def _job_rules(self, rt: ResourceType, obj: JSON, old: JSON | None) -> None:
        """What the Job API does to a Job: on create, the generated selector on the object's uid
        and its labels on the pod template (``manualSelector`` is not emulated); afterwards the
        template and the selector are immutable."""
        name = obj["metadata"]["name"]
        spec = obj.setdefault("spec", {})
        if old is None:  # the selector on the uid is added when the uid exists (_store)
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("completions", 1)
            spec.setdefault("parallelism", 1)
            return
        old_spec = old.get("spec") or {}
        for key in ("template", "selector", "completions"):
            if key in old_spec and spec.get(key, old_spec[key]) != old_spec[key]:
                raise _invalid(rt, name, [f"spec.{key}: Invalid value: field is immutable"])

    def _claim_rules(self, rt: ResourceType, obj: JSON, old: JSON | None) -> None:
        """PersistentVolumeClaims: the DefaultStorageClass admission plugin on create; on update
        the spec is immutable but for a bigger storage request, which the
        PersistentVolumeClaimResize plugin allows only if the claim's StorageClass has
        allowVolumeExpansion."""
        spec = obj.setdefault("spec", {})
        name = obj["metadata"]["name"]
        if old is None:
            spec.setdefault("volumeMode", "Filesystem")
            if "storageClassName" not in spec:
                default = next(
                    (
                        sc
                        for (g, p, _ns, _n), sc in sorted(self.objects.items())
                        if (g, p) == ("storage.k8s.io", "storageclasses")
                        and (sc["metadata"].get("annotations") or {}).get(
                            "storageclass.kubernetes.io/is-default-class"
                        )
                        == "true"
                    ),
                    None,
                )
                if default is not None:
                    spec["storageClassName"] = default["metadata"]["name"]
            return
        old_spec = old.get("spec") or {}

        def without_requests(claim_spec: Mapping[str, Any]) -> JSON:
            rest = {
                k: v for k, v in claim_spec.items() if k not in ("resources", "volumeAttributesClassName")
            }
            resources = dict(claim_spec.get("resources") or {})
            resources.pop("requests", None)
            return {**rest, "resources": resources}

        if without_requests(old_spec) != without_requests(spec):
            raise _invalid(
                rt,
                name,
                [
                    "spec: Forbidden: spec is immutable after creation except resources.requests and "
                    "volumeAttributesClassName for bound claims"
                ],
            )
        before = _quantity_amount(((old_spec.get("resources") or {}).get("requests") or {}).get("storage"))
        after = _quantity_amount(((spec.get("resources") or {}).get("requests") or {}).get("storage"))
        if after < before:
            raise _invalid(
                rt,
                name,
                ["spec.resources.requests.storage: Forbidden: field can not be less than previous value"],
            )
        if after > before:
            class_name = spec.get("storageClassName") or ""
            storage_class = self.objects.get(("storage.k8s.io", "storageclasses", "", class_name))
            if not class_name or not (storage_class or {}).get("allowVolumeExpansion"):
                raise ApiError(
                    403,
                    "Forbidden",
                    f'persistentvolumeclaims "{name}" is forbidden: only dynamically provisioned pvc can be '
                    "resized and the storageclass that provisions the pvc must support resize",
                )

    def _admit_owner_references(
        self, rt: ResourceType, namespace: str, new: JSON, old: JSON | None, user: str | None
    ) -> None:
        """The OwnerReferencesPermissionEnforcement admission plugin (plugin/pkg/admission/gc),
        for RBAC-limited users: changing an existing object's ownerReferences needs `delete` on
        it; a reference that newly sets blockOwnerDeletion needs `update` on the owner's
        ``finalizers`` subresource."""
        if user is None:
            return
        name = new["metadata"]["name"]
        refs = new["metadata"].get("ownerReferences") or []
        old_refs = ((old or {}).get("metadata") or {}).get("ownerReferences") or []
        if refs == old_refs:
            return
        if old is not None and not self._allowed(user, rt.group, rt.plural, "delete", name):
            raise ApiError(
                403,
                "Forbidden",
                f'{rt.plural} "{name}" is forbidden: cannot set an ownerRef on a resource you can\'t delete: '
                f'User "{user}" cannot delete resource "{rt.plural}" in API group "{rt.group}"',
            )
        blocking = {ref.get("uid") for ref in old_refs if ref.get("blockOwnerDeletion")}
        for ref in refs:
            if not ref.get("blockOwnerDeletion") or ref.get("uid") in blocking:
                continue
            owner = self.type_for(str(ref.get("apiVersion", "")), str(ref.get("kind", "")))
            resource = f"{owner.plural}/finalizers" if owner else ""
            if owner is None or not self._allowed(user, owner.group, resource, "update", ref.get("name")):
                group = owner.group if owner else ""
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{rt.plural} "{name}" is forbidden: cannot set blockOwnerDeletion if an ownerReference '
                    f'refers to a resource you can\'t set finalizers on: User "{user}" cannot update '
                    f'resource "{resource}" in API group "{group}" in the namespace "{namespace}"',
                )

    # ------------------------------------------------------------------ verbs

    def _create(self, rt: ResourceType, namespace: str, body: Any, user: str | None = None) -> JSON:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of a create must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") not in (None, namespace):
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the URL")
            meta["namespace"] = namespace
            if ("", "namespaces", "", namespace) not in self.objects:
                raise ApiError(
                    404,
                    "NotFound",
                    f'namespaces "{namespace}" not found',
                    {"name": namespace, "kind": "namespaces"},
                )
            if self._terminating(("", "namespaces", "", namespace)):
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{rt.plural} "{meta.get("name") or meta.get("generateName", "")}" is forbidden: '
                    f"unable to create new content in namespace {namespace} because it is being terminated",
                )
        else:
            meta.pop("namespace", None)
        if rt.schema is not None and self._crd_terminating(rt):
            raise ApiError(
                405, "MethodNotAllowed", "create not allowed while custom resource definition is terminating"
            )
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(_NAME_ALPHABET, k=5))
        self._check_metadata(rt, obj)
        key = (rt.group, rt.plural, namespace if rt.namespaced else "", meta["name"])
        if key in self.objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{rt.plural}{"." + rt.group if rt.group else ""} "{meta["name"]}" already exists',
                {"name": meta["name"], "group": rt.group, "kind": rt.plural},
            )
        if rt.status and rt.key != (CRD_GROUP, "customresourcedefinitions"):
            obj.pop("status", None)  # status is written through the subresource only
        obj = self._check_custom(rt, obj)
        self._check_builtin(rt, obj, None)
        self._admit_owner_references(rt, namespace, obj, None, user)
        stored = self._store(rt, obj)
        if meta.get("ownerReferences"):
            self._schedule_gc()
        return stored

    def _update(
        self, rt: ResourceType, key: ObjKey, new: Any, subresource: str | None, user: str | None = None
    ) -> JSON:
        """Common path of PUT and PATCH on the object or its /status."""
        old = self.objects[key]
        if not isinstance(new, dict):
            raise ApiError(400, "BadRequest", "the object must be a JSON object")
        sent_rv = (new.get("metadata") or {}).get("resourceVersion")
        if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rt.plural} "{key[3]}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                {"name": key[3], "group": rt.group, "kind": rt.plural},
            )
        if subresource == "status":
            result = copy.deepcopy(old)
            if new.get("status") is None:
                result.pop("status", None)
            else:
                result["status"] = new["status"]
        else:
            result = copy.deepcopy(new)
            result.setdefault("metadata", {})
            if rt.status:
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
            meta, old_meta = result["metadata"], old["metadata"]
            for immutable in ("name", "namespace", "uid", "creationTimestamp", "generation"):
                if immutable in old_meta:
                    meta[immutable] = old_meta[immutable]
                else:
                    meta.pop(immutable, None)
            for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                if server_owned in old_meta:
                    meta[server_owned] = old_meta[server_owned]
                else:
                    meta.pop(server_owned, None)
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    raise _invalid(rt, key[3], [f"metadata.finalizers: Forbidden: no new finalizers {added}"])
            if not meta.get("finalizers"):
                meta.pop("finalizers", None)
            if not meta.get("ownerReferences"):
                meta.pop("ownerReferences", None)
        result["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        result["apiVersion"], result["kind"] = rt.api_version, rt.kind
        self._check_metadata(rt, result)
        result = self._check_custom(rt, result)
        if subresource is None:
            self._check_builtin(rt, result, old)
            self._admit_owner_references(rt, key[2], result, old, user)
        return self._replace(rt, key, result)

    def _apply_patch(self, rt: ResourceType, target: JSON, content_type: str, body: bytes) -> JSON:
        try:
            patch = json.loads(body or b"null")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the patch is not JSON: {exc}") from exc
        if content_type == "application/merge-patch+json":
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            result = merge_patch(target, patch)
            assert isinstance(result, dict)
            return result
        if content_type == "application/json-patch+json":
            try:
                result = jsonpatch.JsonPatch(patch).apply(target)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise _invalid(rt, target["metadata"]["name"], [f"the test operation failed: {exc}"]) from exc
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
                raise ApiError(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from exc
            assert isinstance(result, dict)
            return result
        if content_type == "application/strategic-merge-patch+json" and rt.schema is not None:
            raise ApiError(
                415, "UnsupportedMediaType", "strategic merge patch is not supported for custom resources"
            )
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the emulator does not emulate {content_type!r} (server-side apply and strategic merge patch); "
            "use application/merge-patch+json or application/json-patch+json",
        )

    # scale subresource ---------------------------------------------------

    def _scale_of(self, rt: ResourceType, obj: JSON) -> JSON:
        assert rt.scale is not None
        meta = obj["metadata"]
        selector = None
        if rt.scale.label_selector:
            selector = _dotted(obj, rt.scale.label_selector)
        else:
            labels = (_dotted(obj, ".spec.selector.matchLabels") or {}).items()
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels)) or None
        status: JSON = {"replicas": _dotted(obj, rt.scale.status_replicas) or 0}
        if selector:
            status["selector"] = selector
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": _dotted(obj, rt.scale.spec_replicas) or 0},
            "status": status,
        }

    def _write_scale(self, rt: ResourceType, key: ObjKey, scale: Any) -> JSON:
        assert rt.scale is not None
        replicas = (scale.get("spec") or {}).get("replicas") if isinstance(scale, dict) else None
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise _invalid(rt, key[3], ["spec.replicas: must be a non-negative integer"])
        new = copy.deepcopy(self.objects[key])
        sent_rv = (scale.get("metadata") or {}).get("resourceVersion")
        if sent_rv:
            new["metadata"]["resourceVersion"] = sent_rv
        parts = rt.scale.spec_replicas.strip(".").split(".")
        target = new
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = replicas
        return self._scale_of(rt, self._update(rt, key, new, None))

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.content_type))
        self.bodies.append((request.headers.get("User-Agent", ""), await request.read()))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.calls.append((token, request.method, request.path, request.query_string))
        if self.token is not None or self.grants:
            presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if presented != self.token and presented not in self.grants:
                return web.json_response(ApiError(401, "Unauthorized", "Unauthorized").status(), status=401)
        try:
            return await self._route(request)
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if request.method == "GET":
            discovery = self._discovery(parts)
            if discovery is not None:
                return web.json_response(discovery)
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        rt = self.types.get((group, version, rest[0]))
        if rt is None:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        name = rest[1] if len(rest) >= 2 else None
        subresource = rest[2] if len(rest) == 3 else None
        self._authorize(request, group, rest[0], name, subresource, namespace)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        user = token if token in self.grants else None  # None: unrestricted
        if request.method != "GET" and self.before_write is not None:
            self.before_write(request.method, request.path)
        if rt.namespaced and name is not None and not namespace:
            raise ApiError(
                404, "NotFound", f"{rt.plural} is namespaced: use /namespaces/NS/{rt.plural}/{name}"
            )
        if not rt.namespaced and namespace:
            raise ApiError(404, "NotFound", f"{rt.plural} is cluster-scoped")
        if subresource not in (None, "status", "scale") or (subresource == "status" and not rt.status):
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        if subresource == "scale" and rt.scale is None:
            raise ApiError(404, "NotFound", f"{rt.plural} has no scale subresource")
        method = request.method
        if name is None:
            if method == "GET" and request.query.get("watch") in ("true", "1"):
                return await self._watch(request, rt, namespace)
            if method == "GET":
                return web.json_response(self._list(rt, namespace, request.query))
            if method == "POST":
                created = self._create(rt, namespace, await self._json(request), user=user)
                return web.json_response(created, status=201)
            if method == "DELETE":
                return web.json_response(self._delete_collection(rt, namespace, request.query))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a collection")
        key = (rt.group, rt.plural, namespace, name)
        if method == "GET" and request.query.get("watch") in ("true", "1"):
            query = dict(request.query)
            query["fieldSelector"] = ",".join(
                filter(None, [query.get("fieldSelector"), f"metadata.name={name}"])
            )
            return await self._watch(request, rt, namespace, query)
        if key not in self.objects:
            raise _not_found(rt, name)
        if subresource == "scale":
            if method == "GET":
                return web.json_response(self._scale_of(rt, self.objects[key]))
            if method == "PUT":
                return web.json_response(self._write_scale(rt, key, await self._json(request)))
            if method == "PATCH":
                scale = self._apply_patch(
                    rt, self._scale_of(rt, self.objects[key]), request.content_type, await request.read()
                )
                return web.json_response(self._write_scale(rt, key, scale))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on scale")
        if method == "GET":
            return web.json_response(self.objects[key])
        if method == "PUT":
            return web.json_response(self._update(rt, key, await self._json(request), subresource, user=user))
        if method == "PATCH":
            patched = self._apply_patch(
                rt, copy.deepcopy(self.objects[key]), request.content_type, await request.read()
            )
            return web.json_response(self._update(rt, key, patched, subresource, user=user))
        if method == "DELETE" and subresource is None:
            options = await self._json(request, default={})
            propagation = (options or {}).get("propagationPolicy") or request.query.get(
                "propagationPolicy", "Background"
            )
            if propagation not in ("Background", "Foreground", "Orphan"):
                raise ApiError(400, "BadRequest", f"invalid propagationPolicy {propagation!r}")
            obj, gone = self._delete(rt, key, propagation, (options or {}).get("preconditions"))
            return web.json_response(obj, status=200 if gone else 202)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed here")

    def _authorize(
        self, request: web.Request, group: str, plural: str, name: str | None, sub: str | None, namespace: str
    ) -> None:
        """RBAC as the authorizer sees it: the verb and resource come from the URL alone."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.grants:
            return
        method = request.method
        if method == "GET":
            verb = "watch" if request.query.get("watch") in ("true", "1") else "get" if name else "list"
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, "")
            if method == "DELETE":
                verb = "delete" if name else "deletecollection"
        resource = f"{plural}/{sub}" if sub else plural
        if self._allowed(token, group, resource, verb, name):
            return
        where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        raise ApiError(
            403,
            "Forbidden",
            f'{resource} is forbidden: User "{token}" cannot {verb} resource "{resource}" '
            f'in API group "{group}"{where}',
            {"name": name or "", "group": group, "kind": plural},
        )

    def _allowed(self, token: str, group: str, resource: str, verb: str, name: str | None) -> bool:
        """The RBAC decision for one request attribute set (recorded in usage, or in denied)."""
        self.usage.add((token, group, resource, verb))
        for rule in self.grants[token]:
            if (
                {group, "*"} & set(rule.get("apiGroups", []))
                and {resource, "*"} & set(rule.get("resources", []))
                and {verb, "*"} & set(rule.get("verbs", []))
                and (not rule.get("resourceNames") or name in rule["resourceNames"])
            ):
                return True
        self.denied.append((token, group, resource, verb))
        return False

    async def _json(self, request: web.Request, default: Any = None) -> Any:
        body = await request.read()
        if not body:
            if default is not None:
                return default
            raise ApiError(400, "BadRequest", "the request has no body")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from exc

    def _matching(self, rt: ResourceType, namespace: str, query: Mapping[str, str]) -> Iterator[JSON]:
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""))
        for (group, plural, ns, _name), obj in sorted(self.objects.items()):
            if (group, plural) != rt.key or (namespace and ns != namespace):
                continue
            if labels(obj["metadata"].get("labels") or {}) and fields(obj):
                yield obj

    def _list(self, rt: ResourceType, namespace: str, query: Mapping[str, str]) -> JSON:
        """A list, in pages when `limit` is given: the continue token carries the first page's
        resourceVersion and the last key sent; it expires (410) once that version is compacted."""
        items = list(self._matching(rt, namespace, query))
        version, after = str(self._rv), None
        if query.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(query["continue"].encode()))
                version, after = str(token["rv"]), tuple(token["after"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ApiError(400, "BadRequest", f"invalid continue token: {exc}") from exc
            if int(version) < self.compacted_rv:
                raise ApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. "
                    "You can start a new list without the continue parameter.",
                )
            items = [item for item in items if _list_key(item) > after]
        metadata: JSON = {"resourceVersion": version}
        limit = int(query.get("limit", "0") or 0)
        if 0 < limit < len(items):
            items = items[:limit]
            token = {"rv": int(version), "after": list(_list_key(items[-1]))}
            metadata["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            metadata["remainingItemCount"] = len(list(self._matching(rt, namespace, query))) - limit
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": metadata, "items": items}

    def _delete_collection(self, rt: ResourceType, namespace: str, query: Mapping[str, str]) -> JSON:
        doomed = list(self._matching(rt, namespace, query))
        for obj in doomed:
            meta = obj["metadata"]
            key = (rt.group, rt.plural, meta.get("namespace", "") if rt.namespaced else "", meta["name"])
            self._delete(rt, key, query.get("propagationPolicy", "Background"))
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": {}, "items": doomed}

    async def _watch(
        self, request: web.Request, rt: ResourceType, namespace: str, query: Mapping[str, str] | None = None
    ) -> web.StreamResponse:
        query = query if query is not None else request.query
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""))

        def visible(obj: JSON | None) -> bool:
            if obj is None:
                return False
            if namespace and obj["metadata"].get("namespace") != namespace:
                return False
            return labels(obj["metadata"].get("labels") or {}) and fields(obj)

        def translate(event: WatchEvent) -> tuple[str, JSON] | None:
            now, before = visible(event.obj), visible(event.old)
            if event.type == "MODIFIED":
                if now and not before:
                    return "ADDED", event.obj
                if before and not now:
                    return "DELETED", event.obj
            return (event.type, event.obj) if now else None

        start = query.get("resourceVersion", "")
        if start and start != "0" and (not start.isdigit() or int(start) < self.compacted_rv):
            gone = ApiError(410, "Expired", f"too old resource version: {start} ({self.compacted_rv})")
            return web.json_response({"type": "ERROR", "object": gone.status()})
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        # From here to the first write nothing awaits: the backlog and the live queue cannot miss
        # or repeat an event between them.
        backlog: list[tuple[str, JSON]] = []
        if start and start != "0":
            for event in self.history:
                if event.key == rt.key and event.rv > int(start) and (translated := translate(event)):
                    backlog.append(translated)
        else:
            backlog = [("ADDED", obj) for obj in self._matching(rt, namespace, query)]
        sent = self._rv
        watcher = _Watcher(rt.key)
        self.watchers.add(watcher)
        timeout = float(query.get("timeoutSeconds", "0") or 0) or None
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            for type_, obj in backlog:
                await response.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")
            while True:
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if event is None:  # expire_watches(): what a server sends when its cache moved on
                    gone = ApiError(410, "Expired", f"too old resource version: {sent} ({self.compacted_rv})")
                    await response.write(
                        json.dumps({"type": "ERROR", "object": gone.status()}).encode() + b"\n"
                    )
                    break
                if event.rv <= sent:
                    continue
                translated = translate(event)
                if translated is not None:
                    line = json.dumps({"type": translated[0], "object": translated[1]})
                    await response.write(line.encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.discard(watcher)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    # discovery ------------------------------------------------------------

    def _discovery(self, parts: list[str]) -> JSON | None:
        groups: dict[str, list[str]] = {}
        for group, version, _plural in self.types:
            if group and version not in groups.setdefault(group, []):
                groups[group].append(version)
        if parts == ["version"]:
            return {
                "major": str(self.version[0]),
                "minor": str(self.version[1]),
                "gitVersion": f"v{self.version[0]}.{self.version[1]}.0-mailrelay-emulator",
                "platform": "linux/amd64",
            }
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if parts == ["apis"]:
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group(g, vs) for g, vs in groups.items()],
            }
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
            return {"kind": "APIGroup", "apiVersion": "v1"} | _group(parts[1], groups[parts[1]])
        if parts == ["api", "v1"] or (
            len(parts) == 3 and parts[0] == "apis" and parts[2] in groups.get(parts[1], [])
        ):
            group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
            resources: list[JSON] = []
            for rt in self.types.values():
                if (rt.group, rt.version) != (group, version):
                    continue
                resources.append(
                    {
                        "name": rt.plural,
                        "singularName": rt.singular or rt.kind.lower(),
                        "namespaced": rt.namespaced,
                        "kind": rt.kind,
                        "verbs": VERBS,
                        "shortNames": list(rt.short_names),
                        "categories": list(rt.categories),
                    }
                )
                if rt.status:
                    resources.append(
                        {
                            "name": f"{rt.plural}/status",
                            "singularName": "",
                            "namespaced": rt.namespaced,
                            "kind": rt.kind,
                            "verbs": ["get", "patch", "update"],
                        }
                    )
                if rt.scale:
                    resources.append(
                        {
                            "name": f"{rt.plural}/scale",
                            "singularName": "",
                            "namespaced": rt.namespaced,
                            "group": "autoscaling",
                            "version": "v1",
                            "kind": "Scale",
                            "verbs": ["get", "patch", "update"],
                        }
                    )
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "/".join(filter(None, (group, version))),
                "resources": resources,
            }
        return None

    # ------------------------------------------------------------------ direct access for tests

    def compact(self) -> None:
        """Forget the watch history (a later watch from an older resourceVersion gets 410 Gone,
        so does a list continued with an older token)."""
        self.compacted_rv = self._rv
        self.history.clear()

    def expire_watches(self) -> int:
        """Compact, and end every open watch with an ERROR 410 event, as a server does when a
        watcher falls behind its watch cache; clients must list again. Returns how many ended."""
        self.compact()
        for watcher in self.watchers:
            watcher.queue.put_nowait(None)
        return len(self.watchers)

    def find(self, plural: str, namespace: str = "", group: str | None = None) -> list[JSON]:
        return [
            copy.deepcopy(obj)
            for (g, p, ns, _n), obj in sorted(self.objects.items())
            if p == plural and (group is None or g == group) and (not namespace or ns == namespace)
        ]


def _list_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _spec_finalizers(obj: Mapping[str, Any]) -> list[str]:
    """A namespace's spec.finalizers ("kubernetes": its content is not deleted yet)."""
    if obj.get("kind") != "Namespace":
        return []
    return list((obj.get("spec") or {}).get("finalizers") or [])


def _group(name: str, versions: Iterable[str]) -> JSON:
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def _without(obj: JSON, *keys: str) -> JSON:
    return {k: v for k, v in obj.items() if k not in keys}


# --------------------------------------------------------------------------- running it


class EmulatorThread:
    """Serves a `KubernetesApiEmulator` on 127.0.0.1 from a background thread with its own loop, so
    that blocking clients (the `kubernetes` package, a kopf subprocess) and tests can use it."""

    def __init__(self, emulator: KubernetesApiEmulator | None = None) -> None:
        self.emulator = emulator or KubernetesApiEmulator()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._started = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.emulator.app(), handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the Kubernetes API emulator did not start")
        return self

    def stop(self) -> None:
        async def _shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:  # open watches
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` inside the emulator's loop (the only thread that may touch its state)."""

        async def _call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(_call(), self.loop).result(10)

    def kubeconfig(self, path: Path, namespace: str = "default", token: str | None = None) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token or self.emulator.token or "none"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
