"""A real Prometheus (Debian's 2.42) scrapes a running relay with two workers and evaluates the
chart's rules: after mail that is accepted, delivered, deferred, bounced and refused, a
reload and a TLS listener, every relay series the rules and the dashboard query exists in
Prometheus as scraped, and every rule evaluates without error. (The operator's side is
scraped for real in tests/relay_operator/test_operator_e2e.py.)"""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.doctor import find, require
from tests.project.test_monitoring import _dashboard, _dashboard_expressions, _queried, _rules
from tests.relay.apphelp import RelayRun, free_port, ports, relay_to_sink_config, until, write_config
from tests.relay.fronthelp import make_certs
from tests.relay.smtpsink import SmtpSink

OPERATOR_PREFIX = "mailrelay_operator_"


def _get(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _start_prometheus(prometheus: str, tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )


async def test_prometheus_scrapes_every_relay_series_the_rules_and_dashboard_use(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    require("prometheus")
    prometheus = find("prometheus")
    assert prometheus
    wanted = {
        name
        for name in _queried(
            [rule["expr"] for group in _rules()["groups"] for rule in group["rules"]]
            + _dashboard_expressions(_dashboard())
        )
        if not name.startswith(OPERATOR_PREFIX)
    }
    assert len(wanted) >= 10, wanted
    certs = make_certs(tmp_path)
    sink = SmtpSink(rcpt_replies={"later@d.test": "451 4.3.0 later", "bad@d.test": "550 5.1.1 no such user"})
    await sink.start()
    domains = ["d.test", "s.test"]
    data = relay_to_sink_config(
        tmp_path, hostname="scraped.test", domains=domains, sink_port=sink.port, workers=2, tls=certs.tls
    )
    (port, metrics_port), prom_port = ports(data), free_port()
    data["listeners"][0]["tls"] = "starttls"
    config = write_config(tmp_path, data)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rules(), sort_keys=False))
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp_path / "rules.yaml")],
                "scrape_configs": [
                    {
                        "job_name": "relay",
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{metrics_port}"],
                                "labels": {"namespace": "mail", "pod": "edge-0"},
                            }
                        ],
                    }
                ],
            }
        )
    )
    server = _start_prometheus(prometheus, tmp_path, prom_port)
    try:
        run = RelayRun(config)
        runs.append(run.start())
        await asyncio.to_thread(run.wait_for, "relay scraped.test ready")

        def traffic() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.starttls()
                client.sendmail(
                    "a@s.test", ["ok@d.test", "later@d.test", "bad@d.test"], b"Subject: s\r\n\r\nx\r\n"
                )
                refused = client.sendmail(
                    "a@s.test", ["ok2@d.test", "x@elsewhere.test"], b"Subject: t\r\n\r\ny\r\n"
                )
                assert "x@elsewhere.test" in refused

        await asyncio.to_thread(traffic)
        await asyncio.to_thread(run.wait_for, r"deferred 1 recipients")
        run.signal(signal.SIGHUP)  # a reload: mailrelay_config_reloads_total
        await asyncio.to_thread(run.wait_for, r"config reloaded")
        await until(lambda: _ready(prom_port), timeout=60)

        def scraped() -> set[str]:
            answer = _get(prom_port, "/api/v1/label/__name__/values")
            return {name for name in answer["data"] if name.startswith("mailrelay_")}

        await until(lambda: wanted <= scraped(), timeout=90)
        assert _get(prom_port, "/api/v1/targets")["data"]["activeTargets"][0]["health"] == "up"

        def evaluated() -> list[dict[str, Any]] | None:
            rules = [r for g in _get(prom_port, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
            return (
                rules if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules) else None
            )

        await until(lambda: evaluated() is not None, timeout=60)
        rules = evaluated()
        assert rules is not None and len(rules) == 8
        assert [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    finally:
        server.terminate()
        server.wait(30)
        await sink.stop()
