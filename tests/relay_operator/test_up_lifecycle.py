"""`mailrelay up` as a supervisor: crashes, manifest edits, stops and restarts, refusals.

The topology is two relays, `front` → `back` → a maildir, declared on ports 1000 below free
ones and run with ``--port-offset 1000`` (so the offset and the resolution of a `relay` next
hop to the target's shifted local port are exercised by every delivery). `back` starts with
replicas: 0, which is how these tests make the next hop unreachable and mail stay queued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.relay.dnsserver import DnsServer
from tests.relay_operator.up_harness import (
    Up,
    alive,
    find_by_subject,
    free_ports,
    running,
    send,
    wait_for,
    write_documents,
)

OFFSET = 1000


def _topology(
    front_port: int,
    back_port: int,
    back_replicas: int,
    inbox: str = "inbox",
    front_workers: int | None = None,
) -> list[dict[str, Any]]:
    def relay(name: str, port: int, replicas: int, workers: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "MailRelay",
            "metadata": {"name": name, "namespace": "life"},
            "spec": {
                "replicas": replicas,
                "hostname": f"{name}.life.test",
                "listeners": [{"name": "smtp", "port": port - OFFSET, "mode": "relay"}],
                "trustedNetworks": ["127.0.0.0/8"],
                "queue": {"retry": {"minBackoff": "1s", "maxBackoff": "1s"}},
                "routeSelector": {"matchLabels": {"relay": name}},
            },
        }
        if workers is not None:
            body["spec"]["workers"] = workers
        return body

    def route(name: str, owner: str, next_hop: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "RelayRoute",
            "metadata": {"name": name, "namespace": "life", "labels": {"relay": owner}},
            "spec": {"nextHop": next_hop},
        }

    return [
        relay("front", front_port, 1, front_workers),
        relay("back", back_port, back_replicas),
        route("front-to-back", "front", {"relay": {"name": "back"}}),
        route("back-store", "back", {"gateway": {"maildir": {"path": inbox, "layout": "single"}}}),
    ]


def _deferred(up: Up, process: str) -> bool:
    """The relay process logged a deferral (its scheduler keeps the message queued)."""
    return any(line.startswith(f"[{process}] ") and " deferred " in line for line in up.lines)


def _maildir(tmp_path: Path, name: str) -> Path:
    return tmp_path / ".mailrelay" / "life" / "back" / "maildir" / name


def _delivered(up: Up, port: int, maildir: Path, subject: str, what: str) -> None:
    """Send a message with `subject` to `port`; wait (30 s) until it is in `maildir`."""
    send(port, "a@life.test", "someone@example.org", subject)
    wait_for(lambda: find_by_subject(maildir, subject), 30, what, up.output)


def test_crash_restart_scale_up_and_route_reload(tmp_path: Path) -> None:
    front_port, back_port = free_ports(2)
    manifest = write_documents(tmp_path / "life.yaml", _topology(front_port, back_port, back_replicas=0))
    with running(Up(tmp_path, [manifest], "--port-offset", str(OFFSET), "--drain-timeout", "10")) as up:
        up.wait_ready()
        assert up.processes("back") == []
        send(front_port, "a@life.test", "someone@example.org", "queued while back is down")
        wait_for(lambda: _deferred(up, "front-0"), 20, "the message to be deferred in front", up.output)

        # kill -9 the front process while it holds the mail: the supervisor restarts it
        (killed,) = up.pids("front")
        os.kill(killed, signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            (process,) = up.processes("front")
            return process if process["pid"] not in (None, killed) and process["ready"] else None

        front = wait_for(restarted, 30, "front-0 to be restarted", up.output)
        assert front["restarts"] == 1
        assert "[up] front-0 exited (signal SIGKILL); restarting" in up.output()

        # scale back up by editing the manifest, as `kubectl scale` would: the mail gets through
        write_documents(manifest, _topology(front_port, back_port, back_replicas=1))
        mail = wait_for(
            lambda: find_by_subject(_maildir(tmp_path, "inbox"), "queued while back is down"),
            30,
            "the queued message to reach back's maildir",
            up.output,
        )
        assert len(mail.get_all("Received")) == 2
        assert up.pids("front") == [front["pid"]]  # scaling back did not touch front

        # a route edit reloads without a restart: same pids, new route in effect
        up.wait_ready()
        before = {p["name"]: (p["pid"], p["restarts"]) for p in up.processes()}
        write_documents(manifest, _topology(front_port, back_port, back_replicas=1, inbox="inbox-v2"))
        wait_for(lambda: "[up] life/back: configuration changed" in up.output(), 20, "the reload", up.output)
        wait_for(
            lambda: any("config reloaded" in line for line in up.lines if line.startswith("[back-0]")),
            20,
            "back-0 to reload its config",
            up.output,
        )
        _delivered(
            up, front_port, _maildir(tmp_path, "inbox-v2"), "after the route edit", "the new route's maildir"
        )
        after = {p["name"]: (p["pid"], p["restarts"]) for p in up.processes()}
        assert after == before
        assert find_by_subject(_maildir(tmp_path, "inbox"), "after the route edit") is None

        # a listener change restarts that relay's processes; its clients only reload their routes
        (moved_port,) = free_ports(1)
        write_documents(manifest, _topology(front_port, moved_port, back_replicas=1, inbox="inbox-v2"))
        wait_for(
            lambda: up.pids("back") not in ([], [after["back-0"][0]]), 30, "back-0 to be replaced", up.output
        )
        up.wait_ready()
        assert "[up] life/back: listeners changed, restarting its processes" in up.output()
        assert up.pids("front") == [after["front-0"][0]]
        _delivered(
            up,
            front_port,
            _maildir(tmp_path, "inbox-v2"),
            "to the moved listener",
            "delivery to back's new port",
        )
        after = {p["name"]: (p["pid"], p["restarts"]) for p in up.processes()}

        # a broken edit is refused while running; the relays keep the last good configuration
        broken = _topology(front_port, moved_port, back_replicas=1, inbox="inbox-v2")
        broken[3]["spec"]["nextHop"] = {"relay": {"name": "front"}}  # back -> front -> back
        write_documents(manifest, broken)
        # the refusal line comes first and the problems after it: wait for both (under load they
        # can reach the pipe in separate reads)
        wait_for(
            lambda: "[up] the changed manifests are refused" in up.output() and "routing loop" in up.output(),
            20,
            "the refusal naming the routing loop",
            up.output,
        )
        assert {p["name"]: p["pid"] for p in up.processes()} == {k: v[0] for k, v in after.items()}
        assert up.stop(signal.SIGINT) == 0


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc, whichever thread started them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def test_a_crashed_relay_takes_its_workers_along(tmp_path: Path) -> None:
    """kill -9 of a relay with workers: 2 leaves its workers orphaned (they hold the listener
    and the output pipe); `up` kills them, as a pod's processes go with its main process, and
    starts the relay again."""
    front_port, back_port = free_ports(2)
    docs = _topology(front_port, back_port, back_replicas=0, front_workers=2)
    manifest = write_documents(tmp_path / "life.yaml", docs)
    with running(Up(tmp_path, [manifest], "--port-offset", str(OFFSET), "--drain-timeout", "10")) as up:
        up.wait_ready()
        (master,) = up.pids("front")
        children = wait_for(
            lambda: _children(master) if len(_children(master)) >= 2 else None,
            30,
            "its workers",
            lambda: f"{master}: {_children(master)}\n{up.output()}",
        )
        os.kill(master, signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            (process,) = up.processes("front")
            return process if process["pid"] not in (None, master) and process["ready"] else None

        wait_for(restarted, 30, "front-0 to be restarted", up.output)
        assert "[up] front-0 exited (signal SIGKILL); restarting" in up.output()
        assert [pid for pid in children if alive(pid)] == []
        send(front_port, "a@life.test", "someone@example.org", "accepted by the new workers")
        wait_for(lambda: _deferred(up, "front-0"), 20, "the message to be queued", up.output)
        assert up.stop(signal.SIGINT) == 0


def test_stop_leaves_no_process_and_loses_no_message(tmp_path: Path) -> None:
    front_port, back_port = free_ports(2)
    manifest = write_documents(tmp_path / "life.yaml", _topology(front_port, back_port, back_replicas=0))
    with running(Up(tmp_path, [manifest], "--port-offset", str(OFFSET), "--drain-timeout", "10")) as up:
        up.wait_ready()
        send(front_port, "a@life.test", "someone@example.org", "queued before the stop")
        wait_for(lambda: _deferred(up, "front-0"), 20, "the message to be deferred in front", up.output)
        pids = up.pids()
        assert up.stop(signal.SIGINT) == 0
    assert pids and not [pid for pid in pids if alive(pid)]
    spool = tmp_path / ".mailrelay" / "life" / "front" / "front-0" / "spool"
    assert sum(1 for _ in spool.rglob("*") if _.is_file() and _.parent.name in ("incoming", "deferred")) == 1

    # the next `up` (same state directory) delivers it once the next hop runs
    write_documents(manifest, _topology(front_port, back_port, back_replicas=1))
    with running(Up(tmp_path, [manifest], "--port-offset", str(OFFSET))) as again:
        again.wait_ready()
        mail = wait_for(
            lambda: find_by_subject(_maildir(tmp_path, "inbox"), "queued before the stop"),
            30,
            "the message queued before the stop",
            again.output,
        )
        assert mail["Subject"] == "queued before the stop"
        # a supervisor killed outright (SIGKILL, no chance to clean up) takes its relays along
        pids = again.pids()
        assert again.process is not None
        again.process.kill()
        again.process.wait()
        wait_for(
            lambda: not [pid for pid in pids if alive(pid)], 30, "the orphaned relays to exit", again.output
        )


def test_own_dns_server_and_mx_port_are_honoured(tmp_path: Path) -> None:
    """`spec.dns` points the relay at the topology's own DNS server; `nextHop.mx.port` is used
    as declared (MX hosts are outside the topology, so --port-offset does not move it)."""
    out_port, mx_port = free_ports(2)
    with DnsServer() as dns_server:
        dns_server.add("example.test", "MX", "10 mx.example.test.")
        dns_server.add("mx.example.test", "A", "127.0.0.1")
        docs = _topology(out_port, mx_port, back_replicas=1)
        docs[0]["spec"]["dns"] = {"nameservers": [dns_server.nameserver]}
        docs[1]["spec"]["acceptDomains"] = ["example.test"]
        docs[2]["spec"]["nextHop"] = {"mx": {"port": mx_port, "tls": "none"}}
        manifest = write_documents(tmp_path / "mx.yaml", docs)
        with running(Up(tmp_path, [manifest], "--port-offset", str(OFFSET))) as up:
            up.wait_ready()
            send(out_port, "a@life.test", "someone@example.test", "found by MX")
            mail = wait_for(
                lambda: find_by_subject(_maildir(tmp_path, "inbox"), "found by MX"),
                30,
                "MX delivery",
                up.output,
            )
            assert ("example.test.", "MX") in dns_server.queries
            assert len(mail.get_all("Received")) == 2
            assert up.stop(signal.SIGINT) == 0


def test_broken_topology_is_refused_with_checks_explanation(tmp_path: Path) -> None:
    front_port, back_port = free_ports(2)
    docs = _topology(front_port, back_port, back_replicas=1)
    docs[3]["spec"]["nextHop"] = {"relay": {"name": "front"}}  # front -> back -> front
    docs.append(
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "RelayRoute",
            "metadata": {"name": "dangling", "namespace": "life", "labels": {"relay": "front"}},
            "spec": {
                "priority": 5,
                "match": {"recipientDomains": ["x.test"]},
                "nextHop": {"relay": {"name": "nope"}},
            },
        }
    )
    manifest = write_documents(tmp_path / "broken.yaml", docs)
    command = [sys.executable, "-m", "relay"]
    up = subprocess.run(
        [*command, "up", "-f", str(manifest), "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    check = subprocess.run(
        [*command, "check", "-f", str(manifest)], capture_output=True, text=True, timeout=60, check=False
    )
    assert up.returncode == 1, up.stdout + up.stderr
    assert check.returncode == 1
    errors = [line for line in up.stdout.splitlines() if line.startswith("error:")]
    assert errors == [line for line in check.stdout.splitlines() if line.startswith("error:")]
    assert any("routing loop" in line for line in errors)
    assert any("'nope'" in line and "UnknownRelay" in line for line in errors)
    assert "refused" in up.stdout
    assert not (tmp_path / "state" / "status.json").exists()  # nothing was started
