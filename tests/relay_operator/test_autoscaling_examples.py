"""examples/autoscaling: the HPA (through the Prometheus adapter) and the KEDA ScaledObject are
valid against their schemas, their PromQL parses (promtool), they target the MailRelay's scale
subresource, and they scale on metrics the relay exports under those names.

Schemas: the HPA is a built-in kind (kubernetes-validate, strict, every supported version); the
KEDA ScaledObject and the prometheus-adapter chart's rules have schemas written for this project
in tests/relay_operator/schemas/ (each says what it was written from), and the KEDA HPA behavior
is checked with the Kubernetes schema of an HPA's behavior.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from relay import metrics
from tests.doctor import find, require
from tests.relay_operator.conftest import CRDS, ROOT

EXAMPLES = ROOT / "examples" / "autoscaling"
SCHEMAS = Path(__file__).parent / "schemas"
KUBERNETES_VERSIONS = ["1.25", "1.30", "1.34"]
# The relay's metric families the examples scale on (a Counter's samples carry _total).
RELAY_METRICS = {
    "mailrelay_queue_depth",
    "mailrelay_queue_oldest_age_seconds",
    "mailrelay_messages_accepted_total",
}


def load(name: str) -> dict[str, Any]:
    document = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(document, dict)
    return document


def schema(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((SCHEMAS / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def validate(document: dict[str, Any], schema_name: str) -> None:
    jsonschema.Draft202012Validator(schema(schema_name)).validate(document)


def promtool_check(expressions: list[str], tmp_path: Path) -> None:
    """Every expression parses as PromQL (promtool check rules on recording rules of them)."""
    require("promtool")
    rules = {
        "groups": [
            {
                "name": "examples",
                "rules": [{"record": f"example:{i}", "expr": e} for i, e in enumerate(expressions)],
            }
        ]
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [str(find("promtool")), "check", "rules", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def adapter_query(template: str) -> str:
    """A prometheus-adapter metricsQuery as the adapter fills it in for one pod."""
    return (
        template.replace("<<.Series>>", "mailrelay_queue_depth")
        .replace("<<.LabelMatchers>>", 'namespace="mail",pod="edge-0"')
        .replace("<<.GroupBy>>", "pod")
    )


def series_names(query: str) -> set[str]:
    return set(re.findall(r"\b(mailrelay_[a-z_]+)\s*\{", query))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_hpa_is_a_valid_autoscaling_v2_object(version: str) -> None:
    kubernetes_validate.validate(load("hpa.yaml"), version, strict=True)


def test_a_typo_in_the_hpa_is_caught() -> None:
    hpa = load("hpa.yaml")
    hpa["spec"]["behavior"]["scaleDown"]["stabilisationWindowSeconds"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, "1.34", strict=True)


def test_both_target_the_mailrelay_scale_subresource() -> None:
    crd = yaml.safe_load((CRDS / "mailrelay.dev_mailrelays.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    expected = {
        "apiVersion": f"{crd['spec']['group']}/{version['name']}",
        "kind": crd["spec"]["names"]["kind"],
        "name": "edge",
    }
    assert load("hpa.yaml")["spec"]["scaleTargetRef"] == expected
    assert load("keda-scaledobject.yaml")["spec"]["scaleTargetRef"] == expected
    # Never to zero: a pod that drains needs a peer to hand its queue to.
    assert load("hpa.yaml")["spec"]["minReplicas"] >= 1
    assert load("keda-scaledobject.yaml")["spec"]["minReplicaCount"] >= 1


def test_the_adapter_rules_match_their_schema_and_expose_what_the_hpa_asks_for(tmp_path: Path) -> None:
    values = load("prometheus-adapter-values.yaml")
    validate(values, "prometheus-adapter-values.schema.yaml")
    rules = values["rules"]["custom"]
    exposed = set()
    for rule in rules:
        (series,) = series_names(rule["seriesQuery"])
        assert series in RELAY_METRICS
        assert re.fullmatch(rule["name"]["matches"], series)
        exposed.add(re.sub(rule["name"]["matches"], rule["name"]["as"], series))
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    asked = {m["pods"]["metric"]["name"] for m in load("hpa.yaml")["spec"]["metrics"]}
    assert asked <= exposed
    promtool_check(
        [r["seriesQuery"] for r in rules] + [adapter_query(r["metricsQuery"]) for r in rules], tmp_path
    )


def test_the_adapter_schema_refuses_an_unknown_field() -> None:
    values = load("prometheus-adapter-values.yaml")
    values["rules"]["custom"][0]["metricQuery"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        validate(values, "prometheus-adapter-values.schema.yaml")


def test_the_keda_scaledobject_matches_its_schema(tmp_path: Path) -> None:
    scaled = load("keda-scaledobject.yaml")
    validate(scaled, "keda-scaledobject.schema.yaml")
    # Its HPA behavior is an autoscaling/v2 HPA's behavior: the Kubernetes schema decides.
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = copy.deepcopy(load("hpa.yaml"))
    hpa["spec"]["behavior"] = behavior
    kubernetes_validate.validate(hpa, "1.34", strict=True)
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    assert set().union(*(series_names(q) for q in queries)) <= RELAY_METRICS
    promtool_check(queries, tmp_path)
    broken = copy.deepcopy(scaled)
    broken["spec"]["triggers"][1]["metadata"]["metricType"] = "Value"  # a trigger field, not metadata
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, "keda-scaledobject.schema.yaml")


def test_the_examples_scale_down_one_drained_pod_at_a_time() -> None:
    for behavior in (
        load("hpa.yaml")["spec"]["behavior"],
        load("keda-scaledobject.yaml")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
    ):
        down = behavior["scaleDown"]
        assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 600}]
        assert down["stabilizationWindowSeconds"] >= 300


def test_the_intake_metric_is_the_relays_accepted_counter() -> None:
    assert metrics.ACCEPTED._name == "mailrelay_messages_accepted"  # exported as ..._total
