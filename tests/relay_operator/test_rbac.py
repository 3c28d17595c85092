"""operator/relay_operator/rbac.yaml: valid PolicyRules that cover what the operator does, and no
more (the end-to-end suite proves both directions against the emulator's authorizer; these are
the static checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from relay_operator import builders, k8s, topology
from tests.relay_operator import crd_tools

RBAC = yaml.safe_load((Path(__file__).parents[2] / "operator" / "relay_operator" / "rbac.yaml").read_text())


def allowed(group: str, resource: str, *scopes: str) -> set[str]:
    verbs: set[str] = set()
    for scope in scopes or ("namespaced",):
        for rule in RBAC[scope]:
            if group in rule["apiGroups"] and resource in rule["resources"]:
                verbs.update(rule["verbs"])
    return verbs


@pytest.mark.parametrize("version", ["1.25", "1.30", "1.34"])  # 1.25: the lowest supported
def test_rules_are_valid_policy_rules(version: str) -> None:
    for scope in RBAC:
        role: dict[str, Any] = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": f"mailrelay-{scope}"},
            "rules": RBAC[scope],
        }
        kubernetes_validate.validate(role, version, strict=True)


def test_no_wildcards_two_deletes_and_no_secret_reading_beyond_get() -> None:
    deletable = set()
    for scope in RBAC:
        for rule in RBAC[scope]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert not {"deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
            if "delete" in rule["verbs"]:
                deletable |= {
                    (group, resource) for group in rule["apiGroups"] for resource in rule["resources"]
                }
    # StatefulSets, recreated with Orphan propagation to grow their spool claims, and the spool
    # claims of removed pods once verified empty (issue 14). Secrets: read by name, and the
    # hand-off Secret created (never listed, watched or updated).
    assert deletable == {("apps", "statefulsets"), ("", "persistentvolumeclaims")}
    assert allowed("", "secrets") == {"get", "create"}
    assert allowed("", "persistentvolumeclaims") == {"list", "patch", "delete"}
    assert allowed("", "pods") == {"list"}
    assert allowed("batch", "jobs") == {"list", "create"}
    assert allowed("storage.k8s.io", "storageclasses", "cluster") == {"get"}
    assert "scale" not in str(RBAC)


def test_every_built_object_can_be_read_created_and_replaced() -> None:
    docs = [b for _, b in crd_tools.samples()]
    plan = topology.plan_namespace(
        "mail", [d for d in docs if d["kind"] == "MailRelay"], [d for d in docs if d["kind"] == "RelayRoute"]
    )
    kinds = set()
    for obj in builders.build_objects(plan.relays["edge"]):
        resource = k8s.resource_for(obj["apiVersion"], obj["kind"])
        assert allowed(resource.group, resource.plural) >= {"get", "create", "update"}, obj["kind"]
        kinds.add(obj["kind"])
    assert kinds == crd_tools.RELAY_OBJECT_KINDS


def test_api_kinds_status_events_and_kopf() -> None:
    assert allowed("mailrelay.dev", "mailrelays") == {"list", "watch", "patch"}
    assert allowed("mailrelay.dev", "relayroutes") == {"list", "watch"}
    for resource in ("mailrelays", "relayroutes"):
        assert allowed("mailrelay.dev", f"{resource}/status") == {"patch"}
    # OwnerReferencesPermissionEnforcement: blockOwnerDeletion on the children's references.
    assert allowed("mailrelay.dev", "mailrelays/finalizers") == {"update"}
    assert allowed("", "events") == {"create"}
    assert allowed("apiextensions.k8s.io", "customresourcedefinitions", "cluster") == {"list", "watch"}
    assert allowed("", "namespaces", "namespaceScoped") == {"list", "watch"}
    assert allowed("", "namespaces", "namespaced", "cluster") == set()
    assert {"list", "watch", "patch"} <= allowed("kopf.dev", "kopfpeerings", "peeringNamespaced")
    assert {"list", "watch", "patch"} <= allowed("kopf.dev", "clusterkopfpeerings", "peeringClusterWide")
    assert allowed("kopf.dev", "kopfpeerings", "namespaced", "cluster") == set()


@pytest.mark.parametrize("all_namespaces", [True, False])
@pytest.mark.parametrize("peering", [True, False])
def test_composition_per_mode(all_namespaces: bool, peering: bool) -> None:
    cluster, namespaced = crd_tools.operator_rules(all_namespaces=all_namespaces, peering=peering)
    resources = {r for rule in cluster + namespaced for r in rule["resources"]}
    assert ("namespaces" in resources) is not all_namespaces
    assert ("clusterkopfpeerings" in resources) is (all_namespaces and peering)
    assert ("kopfpeerings" in resources) is (peering and not all_namespaces)
    assert {"mailrelays", "customresourcedefinitions"} <= resources
    assert bool(namespaced) is not all_namespaces
