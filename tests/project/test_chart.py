"""The Helm chart, rendered by the real `helm` binary and checked the way a cluster would.

Every value set of ``tests.project.chart_render.VALUE_SETS`` is rendered once; every document is
validated with kubernetes-validate --strict at two Kubernetes minor versions (built-in kinds) or
against its CRD's openAPIV3Schema and CEL rules (MailRelay, RelayRoute, kopf peerings). The
chart's generated files (CRD templates, RBAC copy, values table) must equal what
scripts/sync_chart_crds.py makes from their sources, and invalid values must fail with the
schema's message.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.project.chart_render import (
    CHART,
    NAMESPACE,
    ROOT,
    VALUE_SETS,
    helm,
    manifests_of,
    notes_of,
    rendered,
)
from tests.relay_operator.crd_tools import admission_errors, operator_rules

KUBERNETES_VERSIONS = ("1.29", "1.34")
CUSTOM_KINDS = {
    "MailRelay",
    "RelayRoute",
    "ClusterKopfPeering",
    "KopfPeering",
    "ServiceMonitor",
    "PrometheusRule",
}
CHART_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)


def _sync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sync_chart_crds", ROOT / "scripts" / "sync_chart_crds.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SYNC = _sync()


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = _of_kind(docs, kind)
    return doc


def _relay_monitor(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ServiceMonitor of the relays (the other one scrapes the operator)."""
    (doc,) = [d for d in _of_kind(docs, "ServiceMonitor") if d["metadata"]["name"].endswith("-relays")]
    return doc


def _operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert isinstance(container, dict)
    return container


def _kopf_peering_schema(kind: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all((CHART / "crds" / "kopf-peerings.yaml").read_text()):
        if doc["spec"]["names"]["kind"] == kind:
            schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            assert isinstance(schema, dict)
            return schema
    raise AssertionError(f"no CRD for {kind}")


def _custom_resource_errors(doc: dict[str, Any]) -> list[str]:
    kind = doc["kind"]
    if kind in {"MailRelay", "RelayRoute"}:
        return list(admission_errors(kind, doc))
    if kind in {"ClusterKopfPeering", "KopfPeering"}:
        validator = jsonschema.Draft202012Validator(_kopf_peering_schema(kind))
        return [error.message for error in validator.iter_errors(doc)]
    errors = []
    if kind == "PrometheusRule":  # the Prometheus Operator's; promtool checks the rules themselves
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            errors.append(f"apiVersion {doc['apiVersion']}")
        if set(doc["spec"]) != {"groups"} or not all(
            g.get("name") and g.get("rules") for g in doc["spec"]["groups"]
        ):
            errors.append("spec must be named groups of rules")
        return errors
    # ServiceMonitor: its CRD belongs to the Prometheus Operator; check the fields we rely on.
    if doc["apiVersion"] != "monitoring.coreos.com/v1":
        errors.append(f"apiVersion {doc['apiVersion']}")
    spec = doc["spec"]
    if not spec.get("selector", {}).get("matchLabels"):
        errors.append("no selector")
    if not spec.get("endpoints") or not all(isinstance(e.get("port"), str) for e in spec["endpoints"]):
        errors.append("endpoints must name a port")
    if set(spec) - {"namespaceSelector", "selector", "endpoints", "targetLabels", "jobLabel"}:
        errors.append(f"unexpected spec fields {sorted(spec)}")
    return errors


# ------------------------------------------------------------------------------ every value set


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_document_is_valid_for_two_kubernetes_versions(value_set: str) -> None:
    docs = manifests_of(rendered(value_set))
    assert docs
    for doc in docs:
        where = f"{value_set}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CUSTOM_KINDS:
            assert _custom_resource_errors(doc) == [], where
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise AssertionError(f"{where} at Kubernetes {version}: {error.message}") from error


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_object_carries_the_standard_labels(value_set: str) -> None:
    for doc in manifests_of(rendered(value_set)):
        if doc["metadata"]["name"].endswith("kopf.dev"):
            continue  # chart crds/ directory: plain files, never templated
        labels = doc["metadata"].get("labels", {})
        missing = [key for key in CHART_LABELS if key not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == "mailrelay"
        namespaced = doc["kind"] not in {
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterKopfPeering",
        }
        assert ("namespace" in doc["metadata"]) == namespaced, f"{doc['kind']} namespace"


def test_lint_strict_passes_on_default_and_non_default_values(tmp_path: Path) -> None:
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(VALUE_SETS["namespaced"][0]))
    for args in (["lint", "--strict"], ["lint", "--strict", "-f", str(values_file)]):
        result = helm(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


# ------------------------------------------------------------------------------ the operator


def test_default_operator_is_cluster_wide_standalone_hardened_and_probed() -> None:
    docs = rendered("default")
    deployment = _one(docs, "Deployment")
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = _operator_container(docs)
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container["image"] == f"mailrelay:{app_version}"
    assert container["args"] == [
        "operator",
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
        f"--image=mailrelay:{app_version}",
        "--image-pull-policy=IfNotPresent",
        "--cluster-domain=cluster.local",
        "--standalone",
        "--log-format=json",
        "--metrics-port=8081",
    ]
    assert container["ports"] == [
        {"name": "health", "containerPort": 8080, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsNonRoot"] is True
    assert container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for absent in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert absent not in pod
    assert _of_kind(docs, "ServiceMonitor") == [] and _of_kind(docs, "KopfPeering") == []


def test_namespaced_operator_watches_each_namespace_with_peering_and_debug_logs() -> None:
    docs = rendered("namespaced")
    container = _operator_container(docs)
    assert container["args"] == [
        "operator",
        "--namespace=mail",
        "--namespace=edge",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--image=mailrelay:0.1.0",
        "--image-pull-policy=IfNotPresent",
        "--cluster-domain=corp.internal",
        "--peering=mail-ops",
        "--priority=10",
        "--verbose",
        "--log-format=json",
        "--metrics-port=8081",
    ]
    assert _one(docs, "Deployment")["spec"]["replicas"] == 1
    peerings = _of_kind(docs, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("edge", "mail-ops"),
        ("mail", "mail-ops"),
    ]
    assert _of_kind(docs, "ClusterKopfPeering") == []


def test_custom_values_reach_the_pod_unchanged() -> None:
    values = VALUE_SETS["cluster-wide-custom"][0]
    operator = values["operator"]
    docs = rendered("cluster-wide-custom")
    deployment = _one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "relays-operator"
    template = deployment["spec"]["template"]
    pod = template["spec"]
    container = _operator_container(docs)
    assert container["image"] == "registry.example.com/team/mailrelay:1.2.3"
    assert "--image=registry.example.com/team/mailrelay:1.2.3" in container["args"], "relays use it too"
    assert container["imagePullPolicy"] == "Always"
    assert "--image-pull-policy=Always" in container["args"], "relays are pulled the same way"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod[key] == operator[key], key
    assert container["resources"] == operator["resources"]
    assert container["env"] == [{"name": "TZ", "value": "UTC"}]
    assert container["args"][-1] == "--extra-flag-for-test"
    assert "--peering=mailrelay" in container["args"] and "--all-namespaces" in container["args"]
    assert "--liveness=http://0.0.0.0:9876/healthz" in container["args"]
    assert container["ports"][0]["containerPort"] == 9876
    assert template["metadata"]["annotations"]["example.com/team"] == "mail"
    assert template["metadata"]["labels"]["team"] == "mail"
    assert _one(docs, "ServiceAccount")["metadata"]["annotations"] == {"example.com/role": "mail"}
    assert [p["metadata"]["name"] for p in _of_kind(docs, "ClusterKopfPeering")] == ["mailrelay"]
    for crd in _of_kind(docs, "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {}), "crds.keep=false"


def test_service_monitor_selects_the_relays_the_operator_labels() -> None:
    from relay_operator import naming

    monitor = _relay_monitor(rendered("cluster-wide-custom"))
    assert monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["selector"]["matchLabels"].items() <= naming.labels("edge").items()
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == naming.MANAGED_BY
    assert [(e["port"], e["interval"]) for e in spec["endpoints"]] == [(naming.METRICS_PORT_NAME, "30s")]
    # Enabled without the monitoring.coreos.com/v1 API: the chart renders no ServiceMonitor.
    assert VALUE_SETS["relays-in-values"][0]["metrics"]["serviceMonitor"]["enabled"] is True
    assert _of_kind(rendered("relays-in-values"), "ServiceMonitor") == []


def test_service_monitor_finds_the_metrics_port_of_the_relays_the_operator_renders() -> None:
    """End to end with the operator's builders: `mailrelay render` of the samples."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", "render", "-f", str(ROOT / "crds" / "samples")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    spec = _relay_monitor(rendered("cluster-wide-custom"))["spec"]
    selected = [
        doc
        for doc in objects
        if doc["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= doc["metadata"].get("labels", {}).items()
    ]
    relays = {doc["metadata"]["name"] for doc in objects if doc["kind"] == "StatefulSet"}
    scraped = [
        doc["metadata"]["labels"]["app.kubernetes.io/instance"]
        for doc in selected
        if any(port.get("name") == spec["endpoints"][0]["port"] for port in doc["spec"]["ports"])
    ]
    assert relays and sorted(scraped) == sorted(relays), "each relay scraped through one Service"
    for label in spec["targetLabels"]:
        assert all(label in doc["metadata"]["labels"] for doc in selected)


# ------------------------------------------------------------------------------ RBAC

RBAC_SOURCE = ROOT / "operator" / "relay_operator" / "rbac.yaml"


def _bound_to_the_operator(binding: dict[str, Any], role: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    service_account = _one(docs, "ServiceAccount")["metadata"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role["kind"],
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account["name"], "namespace": service_account["namespace"]}
    ]


def test_the_chart_rbac_copy_is_byte_for_byte_the_operator_source() -> None:
    assert (CHART / "files" / "rbac.yaml").read_bytes() == RBAC_SOURCE.read_bytes()


@pytest.mark.parametrize(("value_set", "peering"), [("default", False), ("cluster-wide-custom", True)])
def test_cluster_wide_rbac_is_one_cluster_role_with_exactly_the_source_rules(
    value_set: str, peering: bool
) -> None:
    docs = rendered(value_set)
    role = _one(docs, "ClusterRole")
    assert (role["rules"], []) == operator_rules(all_namespaces=True, peering=peering)
    _bound_to_the_operator(_one(docs, "ClusterRoleBinding"), role, docs)
    assert _of_kind(docs, "Role") == [] and _of_kind(docs, "RoleBinding") == []
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert "*" not in verbs and all("*" not in rule["resources"] for rule in role["rules"])


def test_namespaced_rbac_is_a_role_per_watched_namespace_plus_the_cluster_rules() -> None:
    docs = rendered("namespaced")  # with peering
    cluster_rules, role_rules = operator_rules(all_namespaces=False, peering=True)
    cluster_role = _one(docs, "ClusterRole")
    assert cluster_role["rules"] == cluster_rules
    _bound_to_the_operator(_one(docs, "ClusterRoleBinding"), cluster_role, docs)
    roles = {doc["metadata"]["namespace"]: doc for doc in _of_kind(docs, "Role")}
    bindings = {doc["metadata"]["namespace"]: doc for doc in _of_kind(docs, "RoleBinding")}
    assert sorted(roles) == sorted(bindings) == ["edge", "mail"]
    for namespace, role in roles.items():
        assert role["rules"] == role_rules
        _bound_to_the_operator(bindings[namespace], role, docs)


def test_no_rbac_without_the_operator_or_with_rbac_create_false() -> None:
    rbac_kinds = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}
    assert not {doc["kind"] for doc in rendered("relays-only")} & rbac_kinds
    docs = rendered("relays-in-values")  # rbac.create=false, an existing ServiceAccount
    assert not {doc["kind"] for doc in docs} & rbac_kinds
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing-operator-account"


# ------------------------------------------------------------------------------ relays and routes


def test_relays_and_routes_from_values_become_valid_custom_resources() -> None:
    values = VALUE_SETS["relays-in-values"][0]
    docs = rendered("relays-in-values")
    assert _of_kind(docs, "CustomResourceDefinition") == [], "crds.install=false"
    for kind, key in (("MailRelay", "relays"), ("RelayRoute", "routes")):
        objects = {doc["metadata"]["name"]: doc for doc in _of_kind(docs, kind)}
        assert sorted(objects) == sorted(item["name"] for item in values[key])
        assert len(objects) >= 2
        for item in values[key]:
            doc = objects[item["name"]]
            assert doc["apiVersion"] == "mailrelay.dev/v1alpha1"
            assert doc["spec"] == item["spec"]
            assert doc["metadata"]["namespace"] == item["namespace"]
            assert item.get("labels", {}).items() <= doc["metadata"]["labels"].items()
            assert admission_errors(kind, doc) == []
    assert _of_kind(docs, "Deployment"), "the operator is still deployed"


def test_a_relays_only_release_deploys_no_operator() -> None:
    docs = manifests_of(rendered("relays-only"))
    assert [doc["kind"] for doc in docs] == ["MailRelay"]
    (relay,) = docs
    assert relay["metadata"]["namespace"] == NAMESPACE
    assert relay["metadata"]["labels"]["env"] == "staging"
    assert relay["metadata"]["annotations"] == {"example.com/owner": "mail"}


# ------------------------------------------------------------------------------ CRDs


def _without_chart_metadata(crd: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The rendered CRD less what the chart adds to the source's metadata."""
    crd = copy.deepcopy(crd)
    for key in CHART_LABELS:
        if key not in source["metadata"].get("labels", {}):
            crd["metadata"]["labels"].pop(key)
    annotations = crd["metadata"].pop("annotations", {})
    annotations.pop("helm.sh/resource-policy", None)
    if annotations:
        crd["metadata"]["annotations"] = annotations
    return crd


def test_rendered_crds_equal_their_sources_and_are_kept_on_uninstall() -> None:
    docs = rendered("default")
    rendered_crds = {
        doc["metadata"]["name"]: doc
        for doc in _of_kind(docs, "CustomResourceDefinition")
        if not doc["metadata"]["name"].endswith(".kopf.dev")
    }
    sources = {}
    for path in SYNC.crd_sources():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                sources[doc["metadata"]["name"]] = doc
    assert (
        sorted(rendered_crds) == sorted(sources) == ["mailrelays.mailrelay.dev", "relayroutes.mailrelay.dev"]
    )
    for name, crd in rendered_crds.items():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        source_labels = sources[name]["metadata"].get("labels", {})
        assert source_labels.items() <= crd["metadata"]["labels"].items(), "the source's labels win"
        assert _without_chart_metadata(crd, sources[name]) == sources[name]
    kopf = sorted(doc["metadata"]["name"] for doc in docs if doc["metadata"]["name"].endswith(".kopf.dev"))
    assert kopf == ["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]


def test_generated_chart_files_are_up_to_date() -> None:
    """Fails when a chart CRD template, the RBAC copy or the values table differs from its source."""
    outdated = [
        str(path.relative_to(ROOT))
        for path, text in SYNC.expected_files().items()
        if not path.exists() or path.read_text() != text
    ]
    assert outdated == [], f"out of date (run `make crds`): {outdated}"
    assert SYNC.stale_crd_templates() == []
    assert SYNC.main(["--check"]) == 0


def test_the_sync_check_notices_a_changed_source() -> None:
    (source,) = [path for path in SYNC.crd_sources() if "relayroutes" in path.name]
    committed = (SYNC.CRD_TEMPLATES / source.name).read_text()
    assert SYNC.render_crd_template(source) == committed
    changed = source.read_text().replace("served: true", "served: false", 1)
    assert changed != source.read_text()
    regenerated = SYNC.render_crd_template(source, changed)
    assert regenerated != committed and "served: false" in regenerated


def test_template_braces_in_a_source_are_escaped() -> None:
    document = "spec:\n  description: 'use {{ .Values }} literally'\n"
    assert (
        SYNC._spec_block(document, "x") == "spec:\n  description: 'use {{ \"{{\" }} .Values }} literally'\n"
    )


# ------------------------------------------------------------------------------ values


def _value_keys(values: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and value and not key.endswith(("Context", "resources", "Selector")):
            keys |= _value_keys(value, prefix + key + ".")
    return keys


def _schema_keys(schema: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, node in schema.get("properties", {}).items():
        keys.add(prefix + key)
        if node.get("additionalProperties") is False:
            keys |= _schema_keys(node, prefix + key + ".")
    return keys


def test_schema_covers_exactly_the_values_and_rejects_unknown_keys_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(values)
    assert _value_keys(values) == _schema_keys(schema) - {"global"}
    for name, (value_set, _, _) in VALUE_SETS.items():
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(value_set))
        assert errors == [], f"{name}: {[e.message for e in errors]}"


def test_every_value_is_documented_and_the_readme_table_lists_it() -> None:
    docs = SYNC.documented_values((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    for doc in docs:
        assert doc.description, doc.key
        assert f"| `{doc.key}` |" in readme
    undocumented = "image:\n  # -- Documented.\n  tag: x\n"
    with pytest.raises(SYNC.SyncError, match="image"):
        SYNC.documented_values(undocumented)


@pytest.mark.parametrize(
    ("command", "values", "message"),
    [
        (
            "template",
            "operator: {logLevel: loud, healthPort: two, watchNamespaces: [Bad_NS]}\n"
            "image: {pullPolicy: Sometimes}\n",
            [
                "at '/operator/logLevel': value must be one of 'info', 'debug'",
                "at '/operator/healthPort': got string, want integer",
                "at '/operator/watchNamespaces/0': 'Bad_NS' does not match pattern",
                "at '/image/pullPolicy': value must be one of 'IfNotPresent', 'Always', 'Never'",
            ],
        ),
        (
            "lint",
            "imageTag: latest\noperator: {logLevl: debug}\nrelays: [{name: edge}]\ncrds: {install: 'yes'}\n",
            [
                "additional properties 'imageTag' not allowed",
                "at '/operator': additional properties 'logLevl' not allowed",
                "at '/relays/0': missing property 'spec'",
                "at '/crds/install': got string, want boolean",
            ],
        ),
    ],
)
def test_invalid_values_fail_with_the_schema_message(
    tmp_path: Path, command: str, values: str, message: list[str]
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(values)
    args = ["template", "mailrelay"] if command == "template" else ["lint", "--strict"]
    result = helm(*args, "-f", str(values_file))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "values don't meet the specifications of the schema" in output
    for line in message:
        assert line in output, f"{line!r} not in:\n{output}"


# ------------------------------------------------------------------------------ NOTES


def test_notes_tell_the_user_what_to_do_next() -> None:
    default = notes_of(rendered("default"))
    assert "The operator watches every namespace." in default
    assert "kubectl apply -f crds/samples/" in default
    assert "kubectl get mailrelays" in default
    assert "mailrelay send --server 127.0.0.1:2525" in default
    assert 'image.repository is "mailrelay"' in default, "warns that no public image exists"
    assert "helm.sh/resource-policy: keep" in default
    namespaced = notes_of(rendered("namespaced"))
    assert "the namespaces: mail, edge." in namespaced
    custom = notes_of(rendered("cluster-wide-custom"))
    assert "no public registry" not in custom
    relays_only = notes_of(rendered("relays-only"))
    assert "This release declares 1 MailRelay(s): edge." in relays_only
    assert "operator watches" not in relays_only
    assert not re.search(r"<no value>|%!", default + namespaced + custom + relays_only)
