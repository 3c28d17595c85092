"""The operator's output configures working relays: two MailRelays and their routes go through
the real operator (kopf, against the API emulator); the ConfigMaps it renders start two real
`mailrelay relay` processes, and a message sent to the edge reaches an SMTP sink through the
internal relay, exactly along the declared topology (edge → internal → smarthost)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from relay_operator import k8s, naming
from tests.relay.apphelp import RelayRun, free_port
from tests.relay.smtpsink import SmtpSink
from tests.relay_operator.conftest import OperatorProcess

POD_PATHS = ("/etc/mailrelay", "/var/spool/mailrelay")


def localize(
    document: Mapping[str, Any],
    *,
    root: Path,
    listener_ports: Mapping[str, int],
    metrics_port: int,
    services: Mapping[str, tuple[str, int]],
) -> dict[str, Any]:
    """Give a relay config rendered for a pod what the pod would have given it, on this machine.

    A pod brings its own network namespace, its mounted volumes and cluster DNS. Here:
    - listeners bind 127.0.0.1 on the free port chosen for them (`listener_ports` by listener
      name) and the metrics endpoint binds 127.0.0.1:`metrics_port`;
    - every path under /etc/mailrelay (mounted ConfigMap and Secrets) or /var/spool/mailrelay
      (the spool volume) moves under `root`;
    - a `relay` next hop to a Service DNS name goes where that Service would route it
      (`services`: DNS name → local host and port).
    Nothing else changes: routes, matches, limits, hostnames and policies are used exactly as the
    operator rendered them.
    """

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, str) and value.startswith(POD_PATHS):
            return str(root / value.lstrip("/"))
        return value

    result: dict[str, Any] = walk(dict(document))
    for listener in result["listeners"]:
        listener["host"], listener["port"] = "127.0.0.1", listener_ports[listener["name"]]
    result["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    for route in result.get("routes", []):
        for hop in [route["nextHop"], *route.get("failover", [])]:
            if hop["kind"] == "relay":
                hop["host"], hop["port"] = services[hop["host"]]
    return result


def mailrelay(name: str, route_label: str) -> dict[str, Any]:
    return {
        "apiVersion": naming.API_VERSION,
        "kind": naming.MAILRELAY_KIND,
        "metadata": {"name": name},
        "spec": {
            "hostname": f"{name}.mail.example.com",
            "listeners": [{"name": "smtp", "port": 25, "mode": "relay"}],
            "acceptDomains": ["corp.example.com"],
            "queue": {"retry": {"minBackoff": "1s", "maxBackoff": "2s"}},
            "routeSelector": {"matchLabels": {"relay": route_label}},
        },
    }


def relayroute(name: str, relay: str, next_hop: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": naming.API_VERSION,
        "kind": naming.RELAYROUTE_KIND,
        "metadata": {"name": name, "labels": {"relay": relay}},
        "spec": {"priority": 100, "match": {"recipientDomains": ["corp.example.com"]}, "nextHop": next_hop},
    }


def rendered_config(kube: Any, namespace: str, relay: str) -> dict[str, Any] | None:
    body = kube.get(k8s.MAILRELAYS, namespace, relay)
    valid = [
        c for c in ((body or {}).get("status") or {}).get("conditions") or [] if c["type"] == "ConfigValid"
    ]
    configmap = kube.get(k8s.CONFIGMAPS, namespace, naming.configmap_name(relay))
    if not valid or valid[0]["status"] != "True" or configmap is None:
        return None
    document = yaml.safe_load(configmap["data"][naming.CONFIG_KEY])
    return document if isinstance(document, dict) and document.get("routes") else None


async def test_rendered_configmaps_run_real_relays_along_the_topology(
    kube: Any, namespace: str, operator_process: OperatorProcess, tmp_path: Path, runs: list[RelayRun]
) -> None:
    sink = await SmtpSink().start()
    try:
        kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge", "edge"))
        kube.create(k8s.MAILRELAYS, namespace, mailrelay("internal", "internal"))
        kube.create(
            k8s.RELAYROUTES,
            namespace,
            relayroute("corp-to-internal", "edge", {"relay": {"name": "internal"}}),
        )
        store = {"smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "none"}}
        kube.create(k8s.RELAYROUTES, namespace, relayroute("corp-store", "internal", store))

        configs = {}
        for relay in ("edge", "internal"):
            configs[relay] = await asyncio.to_thread(
                operator_process.until,
                lambda r=relay: rendered_config(kube, namespace, r),
                f"{relay}'s ConfigMap",
            )
        ports = {relay: (free_port(), free_port()) for relay in configs}
        services = {
            naming.service_dns_name(relay, namespace): ("127.0.0.1", smtp_port)
            for relay, (smtp_port, _metrics) in ports.items()
        }
        for relay, document in configs.items():
            smtp_port, metrics_port = ports[relay]
            local = localize(
                document,
                root=tmp_path / relay,
                listener_ports={"smtp": smtp_port},
                metrics_port=metrics_port,
                services=services,
            )
            config_file = tmp_path / relay / "etc/mailrelay/config" / naming.CONFIG_KEY
            config_file.parent.mkdir(parents=True)
            config_file.write_text(yaml.safe_dump(local, sort_keys=False))
            runs.append(RelayRun(config_file).start())
        for run in runs:
            await asyncio.to_thread(run.wait_for, r"ready \(pid")

        message = EmailMessage()
        message["From"] = "alice@example.net"
        message["To"] = "bob@corp.example.com"
        message["Subject"] = "through the operator's topology"
        message.set_content("hello from the edge\n")
        await aiosmtplib.send(message, hostname="127.0.0.1", port=ports["edge"][0], timeout=30)
        try:
            await asyncio.wait_for(sink.arrived.wait(), 30)
        except TimeoutError:
            raise AssertionError(
                "no delivery; relay logs:\n" + "\n\n".join(run.log for run in runs)
            ) from None
        [received] = sink.messages
        assert received.rcpt_tos == ["bob@corp.example.com"]
        assert received.mail_from == "alice@example.net"
        headers = received.content.split(b"\r\n\r\n", 1)[0].decode()
        received_lines = [line for line in headers.splitlines() if line.startswith("Received:")]
        assert len(received_lines) == 2  # one per hop: edge, then internal
        assert "by internal.mail.example.com" in headers and "by edge.mail.example.com" in headers
        assert headers.index("by internal.mail.example.com") < headers.index("by edge.mail.example.com")
        assert b"hello from the edge" in received.content
    finally:
        await sink.stop()
