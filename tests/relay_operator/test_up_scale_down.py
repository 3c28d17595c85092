"""`mailrelay up` scaling down (issue 14): lowering `replicas` in a manifest while `up` runs
drains the removed process into the remaining one (the relay's own hand-off) and only then
stops it; its spool ends empty and nothing is lost or delivered twice.

A real `mailrelay up` subprocess, one MailRelay with two replicas whose route goes to a
smarthost on loopback that is down at first (a threaded aiosmtpd sink, started later)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from relay_operator.local.table import ListenerView, ProcessView, RelayView, build_rows, render_table
from tests.faults.harness import Sink, message_with_token
from tests.relay_operator.up_harness import Up, free_ports, running, wait_for, write_documents

MESSAGES = 40


def _topology(port: int, sink_port: int, replicas: int) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "MailRelay",
            "metadata": {"name": "edge", "namespace": "scale"},
            "spec": {
                "replicas": replicas,
                "workers": 1,
                "hostname": "edge.scale.test",
                "listeners": [{"name": "smtp", "port": port, "mode": "relay"}],
                "trustedNetworks": ["127.0.0.0/8"],
                "queue": {"retry": {"minBackoff": "1s", "maxBackoff": "2s"}},
                "routeSelector": {"matchLabels": {"relay": "edge"}},
            },
        },
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "RelayRoute",
            "metadata": {"name": "out", "namespace": "scale", "labels": {"relay": "edge"}},
            "spec": {"nextHop": {"smarthost": {"host": "127.0.0.1", "port": sink_port, "tls": "none"}}},
        },
    ]


def _spool_files(spool: Path) -> int:
    return (
        sum(1 for state in spool.iterdir() if state.is_dir() for _ in state.iterdir())
        if spool.is_dir()
        else 0
    )


def _send(port: int, token: str) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.sendmail("sender@sender.test", ["user@example.com"], message_with_token(token))


def test_lowering_replicas_drains_the_removed_replica_into_the_other(tmp_path: Path) -> None:
    port, sink_port = free_ports(2)
    manifest = write_documents(tmp_path / "scale.yaml", _topology(port, sink_port, replicas=2))
    spools = [tmp_path / ".mailrelay" / "scale" / "edge" / f"edge-{i}" / "spool" for i in (0, 1)]
    sink = Sink(port=sink_port)  # not started: the next hop defers everything
    with running(Up(tmp_path, [manifest])) as up:
        up.wait_ready(60)
        tokens = [f"scale{i}" for i in range(MESSAGES)]
        for token in tokens:
            _send(port, token)  # one connection each: SO_REUSEPORT spreads them over both
        wait_for(
            lambda: sum(_spool_files(s) for s in spools) == MESSAGES,
            60,
            "all 40 messages to be queued",
            up.output,
        )
        counts = [_spool_files(s) for s in spools]
        assert all(counts), f"the messages did not spread over both replicas: {counts}"

        write_documents(manifest, _topology(port, sink_port, replicas=1))
        wait_for(
            lambda: "[up] scale/edge: scaling down, draining edge-1 to edge-0" in up.output(),
            30,
            "the drain to begin",
            up.output,
        )
        wait_for(lambda: "[up] edge-1 drained" in up.output(), 120, "edge-1 to drain", up.output)
        wait_for(
            lambda: [p["name"] for p in up.processes("edge")] == ["edge-0"], 60, "edge-1 to stop", up.output
        )
        assert _spool_files(spools[1]) == 0
        assert f"[up] edge-1 drained ({counts[1]} message(s) handed off): stopping it" in up.output()
        assert _spool_files(spools[0]) == MESSAGES
        config = (spools[1].parent / "relay.yaml").read_text()
        assert "drain:" in config and "edge-1" in config  # what made it drain

        sink.start()  # the next hop is back: edge-0 delivers all 40, once each
        try:
            sink.wait_count(MESSAGES, timeout=120)
            wait_for(lambda: _spool_files(spools[0]) == 0, 60, "edge-0's queue to empty", up.output)
            tokens_seen = sink.tokens()
            assert set(tokens_seen) == set(tokens)
            assert max(tokens_seen.values()) == 1, [t for t, n in tokens_seen.items() if n > 1]
        finally:
            sink.shutdown()
        status = json.loads((tmp_path / ".mailrelay" / "status.json").read_text())
        assert [p["name"] for r in status["relays"] for p in r["processes"]] == ["edge-0"]
        assert up.stop(signal.SIGINT) == 0
    assert _spool_files(spools[1]) == 0


def test_scaling_to_zero_keeps_the_queue_and_says_so(tmp_path: Path) -> None:
    """No replica is left to take the mail: the process stops with its queue on disk."""
    port, sink_port = free_ports(2)
    manifest = write_documents(tmp_path / "scale.yaml", _topology(port, sink_port, replicas=1))
    spool = tmp_path / ".mailrelay" / "scale" / "edge" / "edge-0" / "spool"
    with running(Up(tmp_path, [manifest])) as up:
        up.wait_ready(60)
        for i in range(3):
            _send(port, f"zero{i}")
        wait_for(lambda: _spool_files(spool) == 3, 60, "3 messages queued", up.output)
        write_documents(manifest, _topology(port, sink_port, replicas=0))
        wait_for(lambda: up.processes("edge") == [], 60, "edge-0 to stop", up.output)
        assert "scaling to 0, no replica to hand edge-0's queue to" in up.output()
        assert "edge-0 is beyond replicas=0 and its spool still holds 3 message(s)" in up.output()
        assert _spool_files(spool) == 3
        assert up.stop(signal.SIGINT) == 0


def test_the_table_shows_replicas_draining_away() -> None:
    view = RelayView(
        relay="scale/edge",
        listeners=[ListenerView("smtp", "relay", "127.0.0.1:2525")],
        processes=[
            ProcessView("edge-0", 100, True, 9001),
            ProcessView("edge-1", 101, False, 9002, draining=True),
        ],
        replicas=1,
    )
    lines = render_table(build_rows([view]))
    assert "1/1 +1 draining" in lines[1]
    settled = RelayView(view.relay, view.listeners, view.processes[:1], replicas=1)
    assert "draining" not in render_table(build_rows([settled]))[1]
