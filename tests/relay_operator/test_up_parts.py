"""The pure and file-level parts of `mailrelay up`: metrics parsing, the table, the state dir."""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from relay_operator.local import table
from relay_operator.local.layout import (
    StateDir,
    StateDirBusyError,
    count_queued,
    locked,
    write_atomically,
    write_secret,
)
from relay_operator.local.plan import LocalOptions, Plan, PortBook, build_plan
from relay_operator.local.table import ListenerView, MetricsSample, ProcessView, RelayView
from relay_operator.local.up import Console


def _exposition() -> str:
    registry = CollectorRegistry()
    accepted = Counter("mailrelay_messages_accepted", "x", ["listener"], registry=registry)
    delivered = Counter("mailrelay_recipients_delivered", "x", ["route"], registry=registry)
    deferred = Counter("mailrelay_recipients_deferred", "x", ["route"], registry=registry)
    bounced = Counter("mailrelay_recipients_bounced", "x", ["route"], registry=registry)
    depth = Gauge("mailrelay_queue_messages", "x", ["state"], registry=registry)
    sessions = Gauge("mailrelay_smtp_sessions", "x", ["listener"], registry=registry)
    accepted.labels("smtp").inc(3)
    accepted.labels("submission").inc(2)
    delivered.labels("a").inc(4)
    delivered.labels("b").inc(1)
    deferred.labels("a").inc(2)
    bounced.labels("b").inc(1)
    for state, value in {"incoming": 1, "active": 2, "deferred": 3, "hold": 4, "corrupt": 5}.items():
        depth.labels(state).set(value)
    sessions.labels("smtp").set(7)
    return generate_latest(registry).decode()


def test_parse_metrics_sums_the_series_the_table_shows() -> None:
    assert table.parse_metrics(_exposition()) == MetricsSample(
        queued=6, held=4, accepted=5, delivered=5, deferred=2, bounced=1, sessions=7
    )
    assert table.parse_metrics("") == MetricsSample()


def test_rows_sum_processes_and_count_ready_ones() -> None:
    sample = MetricsSample(queued=1, delivered=2, deferred=3, bounced=4)
    view = RelayView(
        relay="mail/edge",
        listeners=[
            ListenerView("smtp", "relay", "127.0.0.1:2525"),
            ListenerView("submission", "submission", "127.0.0.1:2587"),
        ],
        processes=[
            ProcessView("edge-0", 10, True, 9000, sample),
            ProcessView("edge-1", 11, False, 9001, sample),
        ],
        replicas=2,
    )
    down = RelayView(
        "mail/x", [ListenerView("smtp", "relay", "127.0.0.1:1")], [ProcessView("x-0", None, False, 1)]
    )
    lines = table.render_table(table.build_rows([view, down]))
    assert lines[0].split() == [
        "RELAY",
        "LISTENER",
        "ADDRESS",
        "READY",
        "QUEUE",
        "DELIVERED",
        "DEFERRED",
        "BOUNCED",
    ]
    assert lines[1].split() == ["mail/edge", "smtp", "(relay)", "127.0.0.1:2525", "1/2", "2", "4", "6", "8"]
    assert lines[2].split() == ["submission", "(submission)", "127.0.0.1:2587"]
    assert lines[3].split() == ["mail/x", "smtp", "(relay)", "127.0.0.1:1", "0/1", "-", "-", "-", "-"]


def test_secret_becomes_files_like_a_mounted_volume(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    directory = state.secret_dir("mail", "edge", "edge-users")
    write_secret(directory, {"users": b"alice:{PLAIN}x\n", "extra": b"1"})
    assert (directory / "users").read_bytes() == b"alice:{PLAIN}x\n"
    assert stat.S_IMODE((directory / "users").stat().st_mode) == 0o600
    write_secret(directory, {"users": b"bob:{PLAIN}y\n"})
    assert sorted(p.name for p in directory.iterdir()) == ["users"]
    with pytest.raises(ValueError, match="invalid Secret key"):
        write_secret(directory, {"../escape": b""})


def test_atomic_write_reports_whether_anything_changed(tmp_path: Path) -> None:
    target = tmp_path / "a" / "relay.yaml"
    assert write_atomically(target, b"one") is True
    inode = target.stat().st_ino
    assert write_atomically(target, b"one") is False
    assert target.stat().st_ino == inode
    assert write_atomically(target, b"two") is True
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["relay.yaml"]


def test_count_queued_counts_waiting_queue_files(tmp_path: Path) -> None:
    for state, count in {"incoming": 2, "deferred": 1, "hold": 5, "tmp": 3}.items():
        (tmp_path / state).mkdir()
        for index in range(count):
            (tmp_path / state / str(index)).write_bytes(b"x")
    assert count_queued(tmp_path) == 3
    assert count_queued(tmp_path / "missing") == 0


def test_state_dir_lock_refuses_a_second_supervisor(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    with locked(state):
        holder = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path;"
                "from relay_operator.local.layout import StateDir, locked, StateDirBusyError\n"
                "try:\n"
                "    with locked(StateDir(Path(sys.argv[1]))): pass\n"
                "except StateDirBusyError as e:\n"
                "    print(e); sys.exit(3)\n",
                str(state.root),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert holder.returncode == 3, holder.stderr
        assert f"pid {os.getpid()}" in holder.stdout
    with locked(state):
        pass
    assert StateDirBusyError.__doc__


def _up(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "up", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def test_check_only_shows_shifted_ports_on_the_bind_address(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
    result = _up(
        "-f", str(examples), "--check-only", "--port-offset", "20000", "--bind", "127.0.0.2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  submission   127.0.0.2:22587" in result.stdout
    assert "  smtp         127.0.0.2:22525" in result.stdout
    assert "quickstart/edge: 2 process(es), workers auto each" in result.stdout
    assert "ok: 4 MailRelay(s) would run" in result.stdout
    assert not (tmp_path / ".mailrelay").exists()  # nothing written, nothing started


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a relay binds
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        manifest = tmp_path / "one.yaml"
        manifest.write_text(
            "apiVersion: mailrelay.dev/v1alpha1\nkind: MailRelay\nmetadata: {name: solo}\n"
            f"spec:\n  hostname: solo.test\n  listeners: [{{name: smtp, port: {port}}}]\n"
        )
        result = _up("-f", str(manifest), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"default/solo listener smtp: 127.0.0.1:{port} is not available" in result.stderr
    assert not (tmp_path / "state" / "status.json").exists()


def test_console_redraws_the_table_below_log_lines_on_a_terminal() -> None:
    screen = io.StringIO()
    console = Console(screen, tty=True)
    console.table(["HEAD", "row"])
    console.lines("[edge-0] ", ["hello"])
    assert screen.getvalue() == "HEAD\nrow\n" + "\x1b[2F\x1b[J" + "[edge-0] hello\nHEAD\nrow\n"

    plain = io.StringIO()
    console = Console(plain, tty=False)
    console.table(["HEAD", "row"])
    console.table(["HEAD", "row"])  # unchanged: not printed again
    console.line("[up] hi")
    console.table(["HEAD", "row 2"])
    assert plain.getvalue() == "[status] HEAD\n[status] row\n[up] hi\n[status] HEAD\n[status] row 2\n"


def test_each_replica_runs_the_workers_the_operator_would_render(tmp_path: Path) -> None:
    """Under `up` every replica's config file has the cluster's rule: the CPU limit rounded up
    (or the explicit number, or auto)."""
    manifest = tmp_path / "relays.yaml"
    manifest.write_text(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailRelay\nmetadata: {name: capped}\n"
        "spec:\n  replicas: 2\n  hostname: capped.test\n  listeners: [{name: smtp, port: 2525}]\n"
        "  resources: {limits: {cpu: 1500m}}\n"
        "---\napiVersion: mailrelay.dev/v1alpha1\nkind: MailRelay\nmetadata: {name: free}\n"
        "spec:\n  hostname: free.test\n  listeners: [{name: smtp, port: 2526}]\n"
    )
    built = build_plan([manifest], StateDir(tmp_path / "state"), LocalOptions(), PortBook())
    assert isinstance(built, Plan), built
    workers = {
        replica.name: yaml.safe_load(replica.config_yaml)["workers"]
        for relay in built.relays
        for replica in relay.replicas
    }
    assert workers == {"capped-0": 2, "capped-1": 2, "free-0": "auto"}
