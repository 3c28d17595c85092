"""The open-relay probe set on real sockets: `mailrelay open-relay HOST:PORT` (and `mailrelay
check --open-relay`) against a relay with the defaults (nothing relayed, exit 0) and a
deliberately open one (trustedNetworks 0.0.0.0/0: relayed, exit 1); the relay's periodic
self-check sets mailrelay_relay_safe to 1 and 0 for the same two, also behind PROXY."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from relay.core import open_relay
from relay.open_relay import SelfCheck, run_probes
from tests.faults.harness import Relay, relay_config, relay_hop
from tests.relay.apphelp import free_port, http_get, until
from tests.relay.fronthelp import make_config, running_front

ROUTES = [{"name": "all", "nextHop": {"kind": "relay", "name": "x", "host": "127.0.0.1", "port": 9}}]


def safe_value() -> float | None:
    return REGISTRY.get_sample_value("mailrelay_relay_safe")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=120, check=False
    )


async def test_probe_set_against_the_defaults_and_an_open_configuration(tmp_path: Path) -> None:
    for trusted, relayed in (([], False), (["0.0.0.0/0"], True)):
        config = make_config(tmp_path, trustedNetworks=trusted, routes=ROUTES)
        async with running_front(config) as front:
            host, port = front.addresses["smtp"]
            results = await run_probes(host, port, ours="example.com")
            assert [r.probe.name for r in results] == [p.name for p in open_relay.probes("example.com")]
            assert open_relay.is_open(results) is relayed
            if not relayed:  # every probe got a 5xx at MAIL or RCPT
                assert all(r.rcpt >= 500 or r.mail >= 500 for r in results), results
            # The command line, in another process (and through `check`, the operator's CLI).
            done = await asyncio.to_thread(cli, "open-relay", f"{host}:{port}", "--domain", "example.com")
            assert done.returncode == (1 if relayed else 0), done.stdout + done.stderr
            assert ("OPEN RELAY" in done.stdout) is relayed
            check = await asyncio.to_thread(cli, "check", "--open-relay", f"{host}:{port}")
            assert check.returncode == (1 if relayed else 0), check.stdout + check.stderr
            # The relay's own self-check reports the same in its gauge.
            assert await SelfCheck(config, front.addresses).check() is (not relayed)
            assert safe_value() == (0.0 if relayed else 1.0)


async def test_self_check_probes_as_an_untrusted_client_even_when_loopback_is_partly_trusted(
    tmp_path: Path,
) -> None:
    """127.0.0.1 trusted (a local app): the self-check connects from another loopback address,
    so a relay that is safe for the Internet is reported safe."""
    config = make_config(tmp_path, trustedNetworks=["127.0.0.1/32"], routes=ROUTES)
    async with running_front(config) as front:
        assert await SelfCheck(config, front.addresses).check() is True
    everything = make_config(tmp_path, trustedNetworks=["127.0.0.0/8"], routes=ROUTES)
    async with running_front(everything) as front:
        assert await SelfCheck(everything, front.addresses).check() is None  # cannot test: -1
        assert safe_value() == -1.0


async def test_self_check_behind_a_proxy(tmp_path: Path) -> None:
    def proxied(trusted: list[str]) -> Any:
        return make_config(
            tmp_path,
            trustedNetworks=trusted,
            routes=ROUTES,
            listeners=[
                {
                    "name": "smtp",
                    "host": "127.0.0.1",
                    "port": 2525,
                    "mode": "relay",
                    "proxyProtocol": {"trustedFrom": ["127.0.0.0/8"]},
                }
            ],
        )

    # Trusting the cluster's own range (every client seems to come from it) is safe behind a
    # PROXY balancer: the announced outside client is judged.
    config = proxied(["127.0.0.0/8"])
    async with running_front(config) as front:
        assert await SelfCheck(config, front.addresses).check() is True
    config = proxied(["0.0.0.0/0"])
    async with running_front(config) as front:
        assert await SelfCheck(config, front.addresses).check() is False


def test_open_relay_command_usage_errors() -> None:
    done = cli("open-relay", "no-port")
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
    port = free_port()  # nothing listens there
    done = cli("open-relay", f"127.0.0.1:{port}")
    assert done.returncode == 2 and "cannot probe" in done.stderr


async def test_a_running_relay_reports_its_self_check_in_metrics_and_queue(tmp_path: Path) -> None:
    """Two real workers: the supervisor runs the self-check once for the relay; /metrics has
    mailrelay_relay_safe and /queue relaySafe (what the operator's RelaySafe condition reads)."""
    for name, trusted, safe in (("safe", [], True), ("open", ["0.0.0.0/0"], False)):
        config = relay_config(
            tmp_path / name,
            smtp_port=free_port(),
            trusted=trusted,
            routes=[{"name": "all", "nextHop": relay_hop("nowhere", free_port())}],
            workers=2,
            selfCheck={"interval": "1h", "firstAfter": "1s"},
        )
        (tmp_path / name).mkdir()
        relay = Relay(tmp_path / name, config)
        await relay.astart()
        try:
            port = config["metrics"]["port"]

            def reported(port: int = port) -> bool:
                status, body = http_get(port, "/queue")
                return status == 200 and json.loads(body).get("relaySafe") is not None

            await until(reported, timeout=60)
            _status, body = http_get(port, "/queue")
            assert json.loads(body)["relaySafe"] is safe
            _status, text = http_get(port, "/metrics")
            assert re.search(rf"^mailrelay_relay_safe {1.0 if safe else 0.0}$", text, re.M), text
            assert ("OPEN RELAY on listener(s) smtp" in relay.run.log) is not safe
        finally:
            relay.stop()
