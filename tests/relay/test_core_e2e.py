"""Issue 2's "Done when", as one test: a relay started from the documented example config
(`examples/standalone/relay-edge.yaml`, with only ports, directories, the next relay's and the MX port and
the DNS server moved to this test's) accepts mail from swaks and from Python's smtplib and
delivers it
- through a second relay (the same example, its next hop pointed at an aiosmtpd sink) to the sink,
- through a real DNS server answering MX queries to an aiosmtpd MX host on 127.0.0.2,
with exactly one Received header per hop. Both relays are `mailrelay relay --config FILE`
subprocesses."""

from __future__ import annotations

import asyncio
import copy
import signal
import smtplib
import subprocess
from email import message_from_bytes
from pathlib import Path
from typing import Any

import yaml

from relay.config import parse_config
from tests.relay.apphelp import RelayRun, free_port, write_config
from tests.relay.dnsserver import DnsServer
from tests.relay.smtpsink import SmtpSink

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "standalone" / "relay-edge.yaml"
SWAKS = "/usr/bin/swaks"


def from_example(tmp_path: Path, name: str, *, next_relay_port: int, mx_port: int, nameserver: str) -> Path:
    """The documented example with this test's ports, directories and DNS server."""
    data: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    data["hostname"] = f"{name}.localhost"  # two instances of one example: tell the hops apart
    data["listeners"][0]["port"] = free_port()
    data["queue"]["directory"] = str(tmp_path / name / "queue")
    data["metrics"]["port"] = free_port()
    data["dns"]["nameservers"] = [nameserver]
    routes = {route["name"]: route for route in data["routes"]}
    routes["example-to-next-relay"]["nextHop"]["port"] = next_relay_port
    routes["everything-else"]["nextHop"]["port"] = mx_port
    parse_config(data)
    return write_config(tmp_path, data, f"{name}.yaml")


def port_of(path: Path) -> int:
    return int(yaml.safe_load(path.read_text())["listeners"][0]["port"])


def received_by(content: bytes) -> list[str]:
    """The hosts named after "by" in each Received header, newest first."""
    message = message_from_bytes(content)
    return [
        " ".join(value.split()).split(" by ", 1)[1].split()[0] for value in message.get_all("Received", [])
    ]


async def test_example_relay_delivers_through_a_second_relay_and_by_mx(
    tmp_path: Path, dns_server: DnsServer, runs: list[RelayRun]
) -> None:
    sink = await SmtpSink(hostname="sink.test").start()
    mx_host = await SmtpSink(host="127.0.0.2", hostname="mx.other.test").start()
    dns_server.add("other.test", "MX", "10 mx.other.test.")
    dns_server.add("mx.other.test", "A", "127.0.0.2")
    try:
        inner = from_example(
            tmp_path,
            "inner",
            next_relay_port=sink.port,
            mx_port=mx_host.port,
            nameserver=dns_server.nameserver,
        )
        edge = from_example(
            tmp_path,
            "edge",
            next_relay_port=port_of(inner),
            mx_port=mx_host.port,
            nameserver=dns_server.nameserver,
        )
        for path in (inner, edge):
            run = RelayRun(path, cwd=tmp_path).start()
            runs.append(run)
        await asyncio.gather(*(asyncio.to_thread(run.wait_for, r"ready \(pid") for run in runs))
        edge_port = port_of(edge)

        # swaks, as a user would type it
        swaks = await asyncio.to_thread(
            subprocess.run,
            [SWAKS, "--server", f"127.0.0.1:{edge_port}", "--from", "you@example.org",
             "--to", "user@example.com", "--header", "Subject: by swaks", "--body", "hello from swaks"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        assert "<-  250 2.0.0 Ok: queued as" in swaks.stdout

        # smtplib: one message to the next relay's domain, one to a domain found by MX
        def with_smtplib() -> None:
            with smtplib.SMTP("127.0.0.1", edge_port, timeout=30) as client:
                client.sendmail(
                    "you@example.org",
                    ["other@example.com"],
                    b"Subject: by smtplib\r\n\r\nthrough two relays\r\n",
                )
                client.sendmail(
                    "you@example.org", ["someone@other.test"], b"Subject: by smtplib\r\n\r\nby MX\r\n"
                )

        await asyncio.to_thread(with_smtplib)

        await asyncio.wait_for(mx_host.arrived.wait(), 30)
        while len(sink.messages) < 2:
            sink.arrived.clear()
            await asyncio.wait_for(sink.arrived.wait(), 30)

        by_rcpt = {m.rcpt_tos[0]: m for m in sink.messages}
        assert sorted(by_rcpt) == ["other@example.com", "user@example.com"]
        for rcpt, message in by_rcpt.items():
            assert message.mail_from == "you@example.org"
            assert received_by(message.content) == ["inner.localhost", "edge.localhost"], rcpt
            assert f"for <{rcpt}>".encode() in message.content
        assert b"hello from swaks" in by_rcpt["user@example.com"].content
        assert by_rcpt["other@example.com"].content.endswith(
            b"Subject: by smtplib\r\n\r\nthrough two relays\r\n"
        )

        [by_mx] = mx_host.messages
        assert by_mx.rcpt_tos == ["someone@other.test"]
        assert received_by(by_mx.content) == ["edge.localhost"]
        assert by_mx.content.endswith(b"Subject: by smtplib\r\n\r\nby MX\r\n")
        assert dns_server.count("other.test", "MX") >= 1

        for run in runs:
            run.signal(signal.SIGTERM)
        assert [await asyncio.to_thread(run.wait, 30) for run in runs] == [0, 0]
    finally:
        await sink.stop()
        await mx_host.stop()
