"""operator/relay_operator/rbac.yaml: valid PolicyRules that cover what the operator does, and no more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from relay_operator import builders, topology
from tests.relay_operator import crd_tools

RBAC = yaml.safe_load((Path(__file__).parents[2] / "operator" / "relay_operator" / "rbac.yaml").read_text())
WRITE = {"get", "create", "update", "patch", "delete"}


def allowed(group: str, resource: str, scope: str = "namespaced") -> set[str]:
    verbs: set[str] = set()
    for rule in RBAC[scope]:
        if group in rule["apiGroups"] and resource in rule["resources"]:
            verbs.update(rule["verbs"])
    return verbs


@pytest.mark.parametrize("version", ["1.30", "1.34"])
def test_rules_are_valid_policy_rules(version: str) -> None:
    assert set(RBAC) == {"namespaced", "cluster"}
    for scope in RBAC:
        role: dict[str, Any] = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": f"mailrelay-{scope}"},
            "rules": RBAC[scope],
        }
        kubernetes_validate.validate(role, version, strict=True)


def test_no_wildcards_and_no_secret_reading_beyond_get() -> None:
    for scope in RBAC:
        for rule in RBAC[scope]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    assert allowed("", "secrets") == {"get"}
    assert "escalate" not in str(RBAC) and "bind" not in str(RBAC) and "impersonate" not in str(RBAC)


def test_every_built_object_can_be_managed() -> None:
    docs = [b for _, b in crd_tools.samples()]
    plan = topology.plan_namespace(
        "mail", [d for d in docs if d["kind"] == "MailRelay"], [d for d in docs if d["kind"] == "RelayRoute"]
    )
    plurals = {
        "ServiceAccount": "serviceaccounts",
        "ConfigMap": "configmaps",
        "Service": "services",
        "StatefulSet": "statefulsets",
        "PodDisruptionBudget": "poddisruptionbudgets",
    }
    for obj in builders.build_objects(plan.relays["edge"]):
        group = obj["apiVersion"].rpartition("/")[0]
        assert allowed(group, plurals[obj["kind"]]) >= WRITE, obj["kind"]


def test_api_kinds_status_events_and_peering() -> None:
    for resource in ("mailrelays", "relayroutes"):
        assert {"get", "list", "watch", "patch"} <= allowed("mailrelay.dev", resource)
        assert "delete" not in allowed("mailrelay.dev", resource)
        assert allowed("mailrelay.dev", f"{resource}/status") == {"get", "patch"}
    assert "create" in allowed("", "events")
    assert {"list", "watch", "patch"} <= allowed("kopf.dev", "kopfpeerings")
    assert {"list", "watch", "patch"} <= allowed("kopf.dev", "clusterkopfpeerings", "cluster")
    assert allowed("apiextensions.k8s.io", "customresourcedefinitions", "cluster") == {"list", "watch"}
