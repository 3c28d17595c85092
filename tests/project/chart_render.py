"""Renders the Helm chart with the real `helm` binary, once per named value set per test session.

Imported as ``tests.project.chart_render`` by the chart and Dockerfile tests. `helm template`
does not print NOTES.txt, so the chart is rendered from a temporary copy that also carries a
ConfigMap holding NOTES.txt rendered with the same values (``notes_of`` reads it and
``manifests_of`` drops it again).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mailrelay"
NAMESPACE = "mailrelay-system"
NOTES_CONFIGMAP = "zz-chart-notes-under-test"
_NOTES_TEMPLATE = f"""apiVersion: v1
kind: ConfigMap
metadata:
  name: {NOTES_CONFIGMAP}
data:
  notes: {{{{ tpl (.Files.Get "notes-under-test.txt") . | toJson }}}}
"""


def helm_binary() -> str:
    """The helm binary the project installs (`make system-deps`): .venv/bin/helm, else PATH."""
    for candidate in (ROOT / ".venv" / "bin" / "helm", Path(sys.executable).parent / "helm"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("helm")
    assert found, "no helm binary: run `make system-deps` (scripts/install-helm.sh)"
    return found


@cache
def _chart_copy() -> Path:
    target = Path(tempfile.mkdtemp(prefix="mailrelay-chart-")) / "mailrelay"
    shutil.copytree(CHART, target)
    shutil.copy(CHART / "templates" / "NOTES.txt", target / "notes-under-test.txt")
    (target / "templates" / "zz-notes-under-test.yaml").write_text(_NOTES_TEMPLATE)
    return target


def helm(*args: str, chart: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `helm ARGS CHART` (the real chart directory unless told otherwise)."""
    return subprocess.run(
        [helm_binary(), *args, str(chart or CHART)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": tempfile.gettempdir(),
            "HELM_CACHE_HOME": tempfile.gettempdir(),
        },
    )


@cache
def _render(
    values_json: str, api_versions: tuple[str, ...], include_crds: bool
) -> tuple[dict[str, Any], ...]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
        values_file.write(values_json)  # JSON is YAML
        values_file.flush()
        args = ["template", "mailrelay", "--namespace", NAMESPACE, "-f", values_file.name]
        for api in api_versions:
            args += ["--api-versions", api]
        if include_crds:
            args.append("--include-crds")
        result = helm(*args, chart=_chart_copy())
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _samples(kind: str) -> list[dict[str, Any]]:
    """crds/samples/ objects of one kind as `relays:`/`routes:` entries."""
    entries = []
    for path in sorted((ROOT / "crds" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind:
                meta = doc["metadata"]
                entry = {"name": meta["name"], "namespace": meta["namespace"], "spec": doc["spec"]}
                if meta.get("labels"):
                    entry["labels"] = meta["labels"]
                entries.append(entry)
    return entries


SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"

# name: (values, --api-versions, --include-crds). The tests render each set once per session.
VALUE_SETS: dict[str, tuple[dict[str, Any], tuple[str, ...], bool]] = {
    "default": ({}, (), True),
    "namespaced": (
        {
            "operator": {
                "watchNamespaces": ["mail", "edge"],
                "logLevel": "debug",
                "clusterDomain": "corp.internal",
                "peering": {"enabled": True, "name": "mail-ops", "priority": 10},
            }
        },
        (),
        False,
    ),
    "cluster-wide-custom": (
        {
            "fullnameOverride": "relays",
            "image": {
                "repository": "registry.example.com/team/mailrelay",
                "tag": "1.2.3",
                "pullPolicy": "Always",
            },
            "imagePullSecrets": [{"name": "regcred"}],
            "operator": {
                "peering": {"enabled": True},
                "healthPort": 9876,
                "resources": {
                    "requests": {"cpu": "100m", "memory": "200Mi"},
                    "limits": {"cpu": "1", "memory": "400Mi"},
                },
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [
                    {"key": "dedicated", "operator": "Equal", "value": "mail", "effect": "NoSchedule"}
                ],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["mail"]}]}
                            ]
                        }
                    }
                },
                "priorityClassName": "system-cluster-critical",
                "podAnnotations": {"example.com/team": "mail"},
                "podLabels": {"team": "mail"},
                "extraEnv": [{"name": "TZ", "value": "UTC"}],
                "extraArgs": ["--extra-flag-for-test"],
            },
            "serviceAccount": {"annotations": {"example.com/role": "mail"}},
            "crds": {"keep": False},
            "metrics": {
                "serviceMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "prom"}}
            },
        },
        (SERVICE_MONITOR_API,),
        False,
    ),
    "monitoring": (
        {
            "metrics": {
                "serviceMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
                "dashboard": {"enabled": True, "namespace": "monitoring"},
            },
        },
        (SERVICE_MONITOR_API, PROMETHEUS_RULE_API),
        False,
    ),
    "relays-in-values": (
        {
            "crds": {"install": False},
            "rbac": {"create": False},
            "serviceAccount": {"create": False, "name": "existing-operator-account"},
            "relays": _samples("MailRelay"),
            "routes": _samples("RelayRoute"),
            # Enabled, but the cluster does not serve the API: nothing may be rendered.
            "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        },
        (),
        False,
    ),
    "relays-only": (
        {
            "operator": {"enabled": False},
            "crds": {"install": False},
            "relays": [
                {
                    "name": "edge",
                    "labels": {"env": "staging"},
                    "annotations": {"example.com/owner": "mail"},
                    "spec": {
                        "hostname": "edge.staging.example.com",
                        "listeners": [{"name": "smtp", "port": 25}],
                    },
                }
            ],
        },
        (),
        False,
    ),
}


def rendered(value_set: str) -> list[dict[str, Any]]:
    """The documents of one named value set (see VALUE_SETS)."""
    values, api_versions, include_crds = VALUE_SETS[value_set]
    return render(values, api_versions=api_versions, include_crds=include_crds)


def render(
    values: dict[str, Any], *, api_versions: tuple[str, ...] = (), include_crds: bool = False
) -> list[dict[str, Any]]:
    """Every document `helm template` prints for these values, NOTES ConfigMap included."""
    return [
        json.loads(json.dumps(doc))  # a fresh copy: callers may change it
        for doc in _render(json.dumps(values, sort_keys=True), api_versions, include_crds)
    ]


def manifests_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["metadata"]["name"] != NOTES_CONFIGMAP]


def notes_of(docs: list[dict[str, Any]]) -> str:
    (notes,) = [doc for doc in docs if doc["metadata"]["name"] == NOTES_CONFIGMAP]
    return str(notes["data"]["notes"])
