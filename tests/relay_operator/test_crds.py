"""The CRDs in crds/ are valid, structural, self-consistent, and their samples are admitted.

The API server is not available here, so the checks it makes are made by equivalent tools:
kubernetes-validate for the CRD objects themselves, jsonschema for the openAPIV3Schema (strict
about unknown fields), a defaulting pass, and cel-python for every x-kubernetes-validations rule.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.relay_operator import crd_tools

KINDS = ["MailRelay", "RelayRoute"]
KUBERNETES_VERSIONS = ["1.30", "1.34"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_crd_is_a_valid_customresourcedefinition(kind: str, version: str) -> None:
    kubernetes_validate.validate(crd_tools.crd(kind), version, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_crd_names_and_subresources(kind: str) -> None:
    crd = crd_tools.crd(kind)
    spec = crd["spec"]
    plural = kind.lower() + "s"
    assert crd["metadata"]["name"] == f"{plural}.mailrelay.dev"
    assert spec["group"] == "mailrelay.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == plural
    assert spec["names"]["kind"] == kind
    assert spec["names"]["shortNames"] == [{"MailRelay": "mr", "RelayRoute": "rr"}[kind]]
    assert spec["names"]["categories"] == ["mail"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    if kind == "MailRelay":
        assert version["subresources"]["scale"] == {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
        assert columns == ["Ready", "Replicas", "Routes", "Queued", "Oldest", "Draining", "Age"]
    else:
        assert "scale" not in version["subresources"]
        assert columns == ["Priority", "Next hop", "Accepted", "Age"]


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    """The API server's structural-schema rules that a hand-written schema can break."""
    schema = crd_tools.schema(kind)
    assert set(schema["properties"]["metadata"]) == {"type"}
    for path, node in _walk(schema, ""):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, f"{path} has no type"
            assert "anyOf" not in node and "oneOf" not in node, path
        if node.get("type") == "object" and "properties" not in node:
            assert isinstance(node.get("additionalProperties"), dict) or path.endswith("metadata"), path
        if "default" in node:
            jsonschema.validate(node["default"], {k: v for k, v in node.items() if k != "default"})


@pytest.mark.parametrize("kind", KINDS)
def test_every_spec_field_is_described(kind: str) -> None:
    spec = crd_tools.schema(kind)["properties"]["spec"]
    assert [name for name, node in spec["properties"].items() if "description" not in node] == []


@pytest.mark.parametrize("kind", KINDS)
def test_every_cel_rule_compiles_and_has_a_message(kind: str) -> None:
    rules = list(crd_tools.walk_rules(crd_tools.schema(kind)))
    assert rules
    for path, _node, rule in rules:
        crd_tools.compile_rule(rule["rule"])
        assert rule["message"], path


SAMPLES = crd_tools.samples()


def test_samples_cover_the_documented_topology() -> None:
    kinds = [doc["kind"] for _, doc in SAMPLES]
    assert kinds.count("MailRelay") >= 2
    hops = {next(iter(doc["spec"]["nextHop"])) for _, doc in SAMPLES if doc["kind"] == "RelayRoute"}
    assert hops == {"relay", "smarthost", "mx", "gateway", "reject"}
    listener_modes = {
        listener.get("mode", "relay")
        for _, doc in SAMPLES
        if doc["kind"] == "MailRelay"
        for listener in doc["spec"]["listeners"]
    }
    assert listener_modes == {"relay", "submission"}


@pytest.mark.parametrize(("path", "body"), SAMPLES, ids=[p.name for p, _ in SAMPLES])
def test_sample_is_admitted(path: Any, body: dict[str, Any]) -> None:
    assert body["apiVersion"] == "mailrelay.dev/v1alpha1"
    assert crd_tools.admission_errors(body["kind"], body) == []


@pytest.mark.parametrize(
    ("body", "phrase"),
    [(body, api) for _, body, api, _ in crd_tools.INVALID_BODIES],
    ids=[case for case, *_ in crd_tools.INVALID_BODIES],
)
def test_invalid_body_is_refused(body: dict[str, Any], phrase: str) -> None:
    errors = crd_tools.admission_errors(body["kind"], body)
    assert errors, "the API server would admit this body"
    assert any(phrase in error for error in errors), errors


def test_every_cel_rule_is_exercised_by_an_invalid_body() -> None:
    messages = {
        rule["message"] for kind in KINDS for _, _, rule in crd_tools.walk_rules(crd_tools.schema(kind))
    }
    broken = set()
    for _, body, _, _ in crd_tools.INVALID_BODIES:
        schema = crd_tools.schema(body["kind"])
        for failure in crd_tools.cel_failures(schema, crd_tools.apply_defaults(schema, body)):
            broken.add(failure.split(": ", 1)[1])
    assert messages - broken == set()


def test_defaults_fill_a_minimal_relay() -> None:
    schema = crd_tools.schema("MailRelay")
    body = crd_tools.apply_defaults(schema, crd_tools.relay_body(queue={"retry": {}}))
    assert body["spec"]["replicas"] == 1
    assert body["spec"]["listeners"][0] == {
        "name": "smtp",
        "port": 25,
        "mode": "relay",
        "tls": "none",
        "auth": "none",
    }
    assert body["spec"]["queue"]["retry"] == {"minBackoff": "5m", "maxBackoff": "1h", "maxLifetime": "5d"}
