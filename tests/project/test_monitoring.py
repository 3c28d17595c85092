"""The chart's monitoring: the PrometheusRule passes a real `promtool check rules` and the
`promtool test rules` cases in tests/project/promtool/ (a firing and a quiet case per alert),
every metric its rules and its Grafana dashboard query is one the relay or the operator
exports (both sides listed from the code: the metric objects of relay.metrics and
relay_operator.metrics), and the dashboard ConfigMap carries the sidecar label.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from tests.doctor import find, require
from tests.project.chart_render import ROOT, rendered

PROMTOOL_TESTS = ROOT / "tests" / "project" / "promtool" / "alerts-test.yaml"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# The relay and the operator also export the standard process and Python series; the rules and
# the dashboard use only the project's own (mailrelay_*).
_NAME = re.compile(r"\bmailrelay_[a-z0-9_]*[a-z0-9]")


def _documents(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered("monitoring") if doc["kind"] == kind]


def _rules() -> dict[str, Any]:
    (rule,) = _documents("PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def _dashboard() -> dict[str, Any]:
    (configmap,) = [d for d in _documents("ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    loaded = json.loads(configmap["data"]["mailrelay.json"])
    assert isinstance(loaded, dict)
    return loaded


def exported_series() -> set[str]:
    """Every series name the relay and the operator export: their metric objects, and the queue
    gauges the relay writes at scrape time (relay.queue_status.metrics_text)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    import relay.metrics
    import relay_operator.metrics
    from relay.open_relay import relay_safe_gauge
    from relay.queue_status import metrics_text
    from relay.spool import QueueSnapshot

    names: set[str] = {
        family.name for family in text_string_to_metric_families(metrics_text(QueueSnapshot({}, None), 0.0))
    }
    for module in (relay.metrics, relay_operator.metrics):
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                families = value.describe()
            elif isinstance(value, relay_operator.metrics.RelayConditions):
                families = list(value.collect())
            else:
                continue
            for family in families:
                names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    # Made only by the process that runs the open-relay self-check (relay.open_relay), so that
    # no worker exports a default value.
    for family in relay_safe_gauge(CollectorRegistry()).describe():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def _queried(expressions: list[str]) -> set[str]:
    """The metric names the expressions use (none of them selects by a __name__ pattern)."""
    assert not any("__name__" in expr for expr in expressions), "a __name__ matcher: list the names"
    return {name for expr in expressions for name in _NAME.findall(expr)}


def _dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_both_sides_are_listed_from_the_code() -> None:
    exported = exported_series()
    for expected in (
        "mailrelay_messages_accepted_total",
        "mailrelay_delivery_seconds_bucket",
        "mailrelay_queue_messages",
        "mailrelay_queue_oldest_age_seconds",
        "mailrelay_operator_reconciles_total",
        "mailrelay_operator_relay_condition",
    ):
        assert expected in exported


def test_every_metric_of_the_rules_and_the_dashboard_is_exported() -> None:
    exported = exported_series()
    rule_exprs = [rule["expr"] for group in _rules()["groups"] for rule in group["rules"]]
    dashboard_exprs = _dashboard_expressions(_dashboard())
    for where, exprs in (("PrometheusRule", rule_exprs), ("dashboard", dashboard_exprs)):
        names = _queried(exprs)
        assert names, where
        assert names <= exported, f"{where} queries metrics nobody exports: {sorted(names - exported)}"


def test_promtool_checks_and_unit_tests_the_rules(tmp_path: Path) -> None:
    require("promtool")
    promtool = find("promtool")
    assert promtool
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rules(), sort_keys=False))
    checked = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout, checked.stdout
    shutil.copy(PROMTOOL_TESTS, tmp_path / "alerts-test.yaml")
    tested = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "alerts-test.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {rule["alert"] for group in _rules()["groups"] for rule in group["rules"]}
    cases = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    fired = {c["alertname"] for case in cases for c in case["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for case in cases for c in case["alert_rule_test"] if not c["exp_alerts"]}
    assert fired == alerts, f"alerts without a firing case: {sorted(alerts - fired)}"
    assert quiet == alerts, f"alerts without a quiet case: {sorted(alerts - quiet)}"


def test_the_dashboard_is_a_configmap_for_the_grafana_sidecar() -> None:
    (configmap,) = [d for d in _documents("ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    dashboard = _dashboard()
    assert dashboard["uid"] == "mailrelay" and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"])


def test_the_operator_is_scraped_through_its_service() -> None:
    docs = rendered("monitoring")
    (service,) = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-operator-metrics")
    ]
    (monitor,) = [
        d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"].endswith("-operator")
    ]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert f"--metrics-port={ports['metrics']}" in container["args"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
