"""Test helpers that treat the hand-written CRDs the way the API server does: structural schema,
defaulting, strict field checking and the `x-kubernetes-validations` CEL rules (evaluated with
cel-python, a real CEL implementation). Imported as ``tests.relay_operator.crd_tools``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
# the kinds of the objects the operator builds for one MailRelay
RELAY_OBJECT_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "Service",
    "StatefulSet",
    "PodDisruptionBudget",
    "NetworkPolicy",
}
CRD_DIR = ROOT / "crds"
SAMPLES_DIR = CRD_DIR / "samples"
CRD_FILES = {
    "MailRelay": CRD_DIR / "mailrelay.dev_mailrelays.yaml",
    "RelayRoute": CRD_DIR / "mailrelay.dev_relayroutes.yaml",
}
RBAC_FILE = ROOT / "operator" / "relay_operator" / "rbac.yaml"


@cache
def _crd(kind: str) -> dict[str, Any]:
    data = yaml.safe_load(CRD_FILES[kind].read_text())
    assert isinstance(data, dict)
    return data


def crd(kind: str) -> dict[str, Any]:
    return copy.deepcopy(_crd(kind))


def schema(kind: str) -> dict[str, Any]:
    (version,) = crd(kind)["spec"]["versions"]
    result = version["schema"]["openAPIV3Schema"]
    assert isinstance(result, dict)
    return result


def operator_rules(*, all_namespaces: bool, peering: bool) -> tuple[list[Any], list[Any]]:
    """(ClusterRole rules, Role rules of each watched namespace) composed from
    operator/relay_operator/rbac.yaml the way the Helm chart's templates/rbac.yaml composes them."""
    rbac = yaml.safe_load(RBAC_FILE.read_text())
    assert set(rbac) == {
        "namespaced",
        "cluster",
        "namespaceScoped",
        "peeringClusterWide",
        "peeringNamespaced",
    }
    if all_namespaces:
        return [*rbac["namespaced"], *rbac["cluster"], *(rbac["peeringClusterWide"] if peering else [])], []
    return [*rbac["cluster"], *rbac["namespaceScoped"]], [
        *rbac["namespaced"],
        *(rbac["peeringNamespaced"] if peering else []),
    ]


def samples() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(SAMPLES_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path, doc))
    return found


def strict(node: dict[str, Any], *, top: bool = True) -> dict[str, Any]:
    """A copy that rejects unknown fields (kubectl's strict field validation)."""
    node = copy.deepcopy(node)
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node.setdefault("additionalProperties", False)
        for name, child in node["properties"].items():
            if top and name == "metadata":
                continue
            node["properties"][name] = strict(child, top=False)
    if isinstance(node.get("items"), dict):
        node["items"] = strict(node["items"], top=False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"], top=False)
    return node


def schema_errors(kind: str, body: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(strict(schema(kind)))
    return [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(body)
    ]


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """What the API server's defaulting does: fill missing properties that declare a default."""
    if isinstance(value, dict) and "properties" in node:
        result = dict(value)
        for name, child in node["properties"].items():
            if name not in result and "default" in child:
                result[name] = copy.deepcopy(child["default"])
            if name in result:
                result[name] = apply_defaults(child, result[name])
        return result
    if isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        return {k: apply_defaults(node["additionalProperties"], v) for k, v in value.items()}
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(node["items"], item) for item in value]
    return value


def walk_rules(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(schema path, schema node, rule) for every CEL rule in a schema."""
    for rule in node.get("x-kubernetes-validations", []):
        yield path, node, rule
    for name, child in node.get("properties", {}).items():
        yield from walk_rules(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk_rules(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_rules(node["additionalProperties"], f"{path}{{}}")


_ENV = celpy.Environment()


@cache
def _program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule))


def compile_rule(rule: str) -> None:
    _program(rule)


def cel_failures(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """The messages of every CEL rule that the value breaks (evaluated after defaulting)."""
    failures = []
    for rule in node.get("x-kubernetes-validations", []):
        verdict = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        if verdict is not True and not (hasattr(verdict, "__bool__") and bool(verdict) is True):
            failures.append(f"{path or '(root)'}: {rule['message']}")
    if isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name in value:
                failures += cel_failures(child, value[name], f"{path}.{name}")
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            failures += cel_failures(node["items"], item, f"{path}[{index}]")
    return failures


def admission_errors(kind: str, body: dict[str, Any]) -> list[str]:
    """Everything the API server would refuse in this body: schema first, then CEL rules."""
    errors = schema_errors(kind, body)
    if errors:
        return errors
    return cel_failures(schema(kind), apply_defaults(schema(kind), body))


# --------------------------------------------------------------------------- invalid bodies
# Each case: (id, kind, a change to a valid body, a phrase the API server's message contains,
# a phrase the operator's own check (relay_operator.spec) reports). Both must refuse it.


def relay_body(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "mailrelay.dev/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "edge", "namespace": "mail"},
        "spec": {
            "hostname": "edge.example.com",
            "listeners": [{"name": "smtp", "port": 25}],
        },
    }
    base["spec"].update(spec)
    return base


def edge_relay(replicas: int, **spec: Any) -> dict[str, Any]:
    """MailRelay edge as the e2e tests create it (in the namespace they create it in): relay
    mode on port 2525, taking the RelayRoutes labelled relay=edge; `spec` adds to its spec."""
    return {
        "apiVersion": "mailrelay.dev/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "edge"},
        "spec": {
            "replicas": replicas,
            "hostname": "edge.mail.example.com",
            "listeners": [{"name": "smtp", "port": 2525, "mode": "relay"}],
            "routeSelector": {"matchLabels": {"relay": "edge"}},
            **spec,
        },
    }


def route_body(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "mailrelay.dev/v1alpha1",
        "kind": "RelayRoute",
        "metadata": {"name": "r", "namespace": "mail", "labels": {"relay": "edge"}},
        "spec": {"nextHop": {"mx": {}}},
    }
    base["spec"].update(spec)
    return base


def _renamed(body: dict[str, Any], name: str) -> dict[str, Any]:
    body["metadata"]["name"] = name
    return body


INVALID_BODIES: list[tuple[str, dict[str, Any], str, str]] = [
    # CEL rules
    ("name-not-dns1035", _renamed(relay_body(), "Edge_1"), "DNS-1035", "DNS-1035"),
    ("name-too-long", _renamed(relay_body(), "e" * 41), "DNS-1035", "DNS-1035"),
    (
        "listener-ports-clash",
        relay_body(listeners=[{"name": "a", "port": 25}, {"name": "b", "port": 25}]),
        "same port",
        "same port",
    ),
    (
        "submission-without-auth",
        relay_body(listeners=[{"name": "sub", "port": 587, "mode": "submission"}]),
        "submission listener needs auth",
        "submission listener needs auth",
    ),
    (
        "http-listener-with-starttls",
        relay_body(
            listeners=[{"name": "api", "port": 8025, "mode": "http", "tls": "starttls"}],
            tls={"secretName": "t"},
            api={"tokensSecretRef": {"name": "clients"}},
        ),
        "http listener takes tls none or implicit",
        "http listener takes tls none or implicit",
    ),
    (
        "http-listener-without-tokens",
        relay_body(listeners=[{"name": "api", "port": 8025, "mode": "http"}]),
        "http listener needs spec.api.tokensSecretRef",
        "set spec.api.tokensSecretRef",
    ),
    (
        "selector-in-without-values",
        relay_body(routeSelector={"matchExpressions": [{"key": "relay", "operator": "In"}]}),
        "need values",
        "need values",
    ),
    (
        "selector-exists-with-values",
        relay_body(
            routeSelector={"matchExpressions": [{"key": "relay", "operator": "Exists", "values": ["x"]}]}
        ),
        "need values",
        "take none",
    ),
    ("hop-two-kinds", route_body(nextHop={"mx": {}, "relay": {"name": "b"}}), "exactly one", "exactly one"),
    ("hop-no-kind", route_body(nextHop={}), "exactly one", "exactly one"),
    (
        "gateway-two-kinds",
        route_body(nextHop={"gateway": {"maildir": {"path": "a"}, "pipe": {"command": ["cat"]}}}),
        "exactly one of webhook, maildir, pipe",
        "exactly one of webhook, maildir, pipe",
    ),
    (
        "gateway-no-kind",
        route_body(nextHop={"gateway": {}}),
        "exactly one of webhook",
        "exactly one of webhook",
    ),
    (
        "reject-class-mismatch",
        route_body(nextHop={"reject": {"code": 451, "message": "5.7.1 no"}}),
        "class of code",
        "class of code",
    ),
    (
        "failover-two-kinds",
        route_body(failover=[{"mx": {}, "smarthost": {"host": "a.example"}}]),
        "failover hop needs exactly one",
        "exactly one",
    ),
    (
        "relay-ca-without-verification",
        route_body(nextHop={"relay": {"name": "internal", "tls": "starttls", "caSecretRef": {"name": "ca"}}}),
        "caSecretRef needs tls starttls-verify",
        "caSecretRef needs tls starttls-verify",
    ),
    (
        "smarthost-ca-without-tls",
        route_body(
            nextHop={"smarthost": {"host": "a.example", "tls": "none", "caSecretRef": {"name": "ca"}}}
        ),
        "caSecretRef needs tls",
        "caSecretRef needs tls",
    ),
    (
        "smarthost-ca-skipping-verification",
        route_body(
            failover=[
                {
                    "smarthost": {
                        "host": "a.example",
                        "insecureSkipVerify": True,
                        "caSecretRef": {"name": "ca"},
                    }
                }
            ]
        ),
        "without insecureSkipVerify",
        "without insecureSkipVerify",
    ),
    (
        "webhook-ca-on-http",
        route_body(
            nextHop={
                "gateway": {"webhook": {"url": "http://archive.example/in", "caSecretRef": {"name": "ca"}}}
            }
        ),
        "caSecretRef needs an https:// url",
        "caSecretRef needs an https:// url",
    ),
    # schema bounds, enums and patterns
    ("listener-port-range", relay_body(listeners=[{"name": "smtp", "port": 70000}]), "70000", "65535"),
    ("listener-tls-enum", relay_body(listeners=[{"name": "smtp", "port": 25, "tls": "ssl"}]), "ssl", "tls"),
    ("duration-pattern", relay_body(queue={"retry": {"minBackoff": "5 minutes"}}), "5 minutes", "duration"),
    ("quantity-pattern", relay_body(limits={"maxMessageSize": "25MB"}), "25MB", "quantity"),
    (
        "smarthost-port-range",
        route_body(nextHop={"smarthost": {"host": "a.example", "port": 0}}),
        "0",
        "port",
    ),
    ("failover-reject", route_body(failover=[{"reject": {}}]), "reject", "reject"),
    ("unknown-field", relay_body(listener=[]), "listener", "listener"),
    ("maildir-parent", route_body(nextHop={"gateway": {"maildir": {"path": "../etc"}}}), "../etc", "path"),
    (
        "ca-key-pattern",
        route_body(nextHop={"smarthost": {"host": "a.example", "caSecretRef": {"name": "ca", "key": "a/b"}}}),
        "a/b",
        "key",
    ),
]
