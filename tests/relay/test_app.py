"""The relay process as a user runs it: `mailrelay relay --config FILE` in a subprocess, real
sockets on 127.0.0.1, a real SMTP sink as the next hop. Reload (file change and SIGHUP),
invalid reloads, SIGTERM drain, SIGKILL after 250 and delivery after restart, workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.config_watch import ConfigWatcher
from tests.relay.apphelp import (
    ConfigMapDir,
    RelayRun,
    free_port,
    http_get,
    relay_to_sink_config,
    until,
    write_config,
)
from tests.relay.fronthelp import RawClient
from tests.relay.smtpsink import SmtpSink

MESSAGE = b"Subject: app test\r\nFrom: a@sender.org\r\n\r\nhello\r\n"


def relay_config(
    tmp_path: Path, smtp_port: int, metrics_port: int, sink_port: int, **extra: Any
) -> dict[str, Any]:
    return relay_to_sink_config(
        tmp_path,
        hostname="app.relay.test",
        domains=["example.com", "blocked.example.com"],
        smtp_port=smtp_port,
        metrics_port=metrics_port,
        sink_port=sink_port,
        **extra,
    )


async def send(port: int, rcpt: str = "user@example.com") -> str:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    _errors, text = await smtp.sendmail("a@sender.org", [rcpt], MESSAGE)
    await smtp.quit()
    return text


async def at_rcpt(port: int, rcpt: str) -> tuple[RawClient, int]:
    """A session that has given EHLO, MAIL and RCPT TO:<rcpt>; and the RCPT reply's code."""
    client = await RawClient.connect("127.0.0.1", port)
    await client.reply()
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@sender.org>")
    code, _ = await client.cmd(f"RCPT TO:<{rcpt}>")
    return client, code


async def rcpt_reply(port: int, rcpt: str) -> int:
    client, code = await at_rcpt(port, rcpt)
    await client.cmd("QUIT")
    await client.close()
    return code


async def in_data(port: int) -> RawClient:
    """A session inside DATA (354 given) for late@example.com."""
    client, _ = await at_rcpt(port, "late@example.com")
    assert (await client.cmd("DATA"))[0] == 354
    return client


def run_once(config: Path) -> subprocess.CompletedProcess[str]:
    """`mailrelay relay --config config` to its end (a config it refuses)."""
    return subprocess.run(
        [sys.executable, "-m", "relay", "relay", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    data = relay_config(tmp_path, 2525, 0, 2526)
    data["listeners"][0]["port"] = 70000
    path = write_config(tmp_path, data)
    result = run_once(path)
    assert result.returncode == 2
    assert "listeners.0.port" in result.stderr and "65535" in result.stderr
    missing = run_once(tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "cannot read config" in missing.stderr


async def test_relay_process_delivers_reloads_and_drains(tmp_path: Path, runs: list[RelayRun]) -> None:
    sink = await SmtpSink().start()
    smtp_port, metrics_port = free_port(), free_port()
    # one process: with several workers a connection may reach one that has not had SIGTERM yet
    config = relay_config(tmp_path, smtp_port, metrics_port, sink.port, workers=1)
    configmap = ConfigMapDir(tmp_path / "config")
    runs.append(run := configmap.start(config))
    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid")
        # accept and deliver to the next hop
        text = await send(smtp_port)
        assert text.startswith("2.0.0 Ok: queued as ")
        queue_id = text.rsplit(" ", 1)[1]
        await asyncio.wait_for(sink.arrived.wait(), 30)
        [received] = sink.messages
        assert received.content.startswith(b"Received: from ")
        assert f"by app.relay.test (mailrelay) with ESMTP id {queue_id}".encode() in received.content
        assert await asyncio.to_thread(http_get, metrics_port, "/healthz") == (200, "ok\n")
        assert (await asyncio.to_thread(http_get, metrics_port, "/readyz"))[0] == 200
        _, body = await asyncio.to_thread(http_get, metrics_port, "/metrics")
        assert 'mailrelay_messages_accepted_total{listener="smtp"} 1.0' in body
        assert 'mailrelay_recipients_delivered_total{route="to-sink"} 1.0' in body
        # every log line about the message carries its queue id
        assert run.count(queue_id) >= 2

        # reload by a ConfigMap-style symlink swap: a reject route for blocked.example.com
        assert await rcpt_reply(smtp_port, "x@blocked.example.com") == 250
        blocked = dict(config)
        blocked["routes"] = [
            {
                "name": "block",
                "priority": 10,
                "match": {"recipientDomains": ["blocked.example.com"]},
                "nextHop": {"kind": "reject", "code": 550, "message": "5.7.1 blocked by policy"},
            },
            *config["routes"],
        ]
        configmap.publish(blocked)
        await asyncio.to_thread(run.wait_for, "config reloaded: 2 routes")
        assert await rcpt_reply(smtp_port, "x@blocked.example.com") == 550
        assert await rcpt_reply(smtp_port, "x@example.com") == 250

        # an invalid file is refused and counted; the running routes stay
        configmap.publish("hostname: [broken\n")
        await asyncio.to_thread(run.wait_for, "invalid file, keeping the running configuration")
        assert await rcpt_reply(smtp_port, "x@blocked.example.com") == 550
        _, body = await asyncio.to_thread(http_get, metrics_port, "/metrics")
        assert 'mailrelay_config_reloads_total{result="invalid"} 1.0' in body
        assert 'mailrelay_config_reloads_total{result="ok"} 1.0' in body

        # SIGHUP reloads without any file change
        configmap.publish(config)
        await asyncio.to_thread(run.wait_for, "config reloaded: 1 routes")
        run.signal(signal.SIGHUP)
        await asyncio.to_thread(run.wait_for, "config reloaded: 1 routes", occurrences=2)
        assert await rcpt_reply(smtp_port, "x@blocked.example.com") == 250

        # SIGTERM: the transaction in flight finishes, new sessions get 421 4.3.2, exit 0
        busy = await in_data(smtp_port)
        run.signal(signal.SIGTERM)
        await asyncio.to_thread(run.wait_for, "shutting down")
        late = await RawClient.connect("127.0.0.1", smtp_port)
        code, text = await late.reply()
        assert (code, text.split()[0]) == (421, "4.3.2")
        await busy.send(MESSAGE + b".\r\n")
        assert (await busy.reply())[0] == 250
        assert await asyncio.to_thread(run.wait, 30) == 0
        await until(lambda: len(sink.messages) == 2 or any((tmp_path / "queue").rglob("*")))
    finally:
        await sink.stop()


async def test_sigterm_with_several_workers_refuses_every_new_session(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    """Issue 14: the supervisor has every worker stop taking sessions before it goes on (and
    logs "shutting down"), so no new session reaches a worker that was not told yet."""
    sink = await SmtpSink().start()
    smtp_port, metrics_port = free_port(), free_port()
    config = relay_config(tmp_path, smtp_port, metrics_port, sink.port, workers=2)
    run = RelayRun(write_config(tmp_path, config)).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid", occurrences=2)
        await until(lambda: http_get(metrics_port, "/readyz")[0] == 200)
        busy = await in_data(smtp_port)
        run.signal(signal.SIGTERM)
        await asyncio.to_thread(run.wait_for, "shutting down 2 workers: none takes new sessions")
        for _ in range(12):  # SO_REUSEPORT spreads them over both workers
            late = await RawClient.connect("127.0.0.1", smtp_port)
            code, text = await late.reply()
            assert (code, text.split()[0]) == (421, "4.3.2")
            await late.close()
        await busy.send(MESSAGE + b".\r\n")
        assert (await busy.reply())[0] == 250
        assert await asyncio.to_thread(run.wait, 60) == 0
    finally:
        await sink.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigusr1_stops_taking_sessions_but_keeps_delivering(
    tmp_path: Path, runs: list[RelayRun], workers: int
) -> None:
    """Issue 14: the preStop hook sends SIGUSR1 first: new sessions get 421 4.3.2 and /readyz
    503, the transaction in flight ends with 250 and is delivered, a reload does not reopen the
    door, and the SIGTERM that follows ends the process."""
    sink = await SmtpSink().start()
    smtp_port, metrics_port = free_port(), free_port()
    config = relay_config(tmp_path, smtp_port, metrics_port, sink.port, workers=workers)
    run = RelayRun(write_config(tmp_path, config)).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid", occurrences=workers)
        await until(lambda: http_get(metrics_port, "/readyz")[0] == 200)
        busy = await RawClient.connect("127.0.0.1", smtp_port)
        await busy.reply()
        await busy.cmd("EHLO client.test")
        await busy.cmd("MAIL FROM:<a@sender.org>")
        await busy.cmd("RCPT TO:<inflight@example.com>")
        assert (await busy.cmd("DATA"))[0] == 354
        run.signal(signal.SIGUSR1)
        await asyncio.to_thread(run.wait_for, r"stopping \(preStop\): no new sessions", occurrences=workers)

        async def refused_everywhere() -> None:
            for _ in range(8):  # SO_REUSEPORT spreads them over the workers
                late = await RawClient.connect("127.0.0.1", smtp_port)
                code, text = await late.reply()
                assert (code, text.split()[0]) == (421, "4.3.2")
                await late.close()

        await refused_everywhere()
        assert http_get(metrics_port, "/readyz")[0] == 503
        await busy.send(MESSAGE + b".\r\n")
        assert (await busy.reply())[0] == 250
        await asyncio.wait_for(sink.arrived.wait(), 60)  # delivery goes on
        assert [m.rcpt_tos for m in sink.messages] == [["inflight@example.com"]]
        run.signal(signal.SIGHUP)
        await asyncio.to_thread(run.wait_for, "config reloaded", occurrences=workers)
        await refused_everywhere()
        run.signal(signal.SIGTERM)
        assert await asyncio.to_thread(run.wait, 60) == 0
    finally:
        await sink.stop()


async def test_sigkill_after_250_loses_nothing(tmp_path: Path, runs: list[RelayRun]) -> None:
    smtp_port, metrics_port, sink_port = free_port(), free_port(), free_port()
    path = write_config(tmp_path, relay_config(tmp_path, smtp_port, metrics_port, sink_port))
    first = RelayRun(path).start()
    runs.append(first)
    await asyncio.to_thread(first.wait_for, r"ready \(pid")
    text = await send(smtp_port)
    first.kill()  # SIGKILL right after the 250
    queue_id = text.rsplit(" ", 1)[1]
    assert first.process is not None and first.process.returncode == -signal.SIGKILL
    # the next hop comes up only now: nothing can have been delivered before the kill
    sink = await SmtpSink(port=sink_port).start()
    try:
        second = RelayRun(path).start()
        runs.append(second)
        await asyncio.to_thread(second.wait_for, r"ready \(pid")
        await asyncio.wait_for(sink.arrived.wait(), 60)
        [received] = sink.messages
        assert received.rcpt_tos == ["user@example.com"]
        assert f"id {queue_id}".encode() in received.content
        assert received.content.count(b"Received:") == 1
        assert received.content.endswith(MESSAGE)
        second.signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        await sink.stop()


async def test_two_workers_share_the_port(tmp_path: Path, runs: list[RelayRun]) -> None:
    sink = await SmtpSink().start()
    smtp_port, metrics_port = free_port(), free_port()
    path = write_config(tmp_path, relay_config(tmp_path, smtp_port, metrics_port, sink.port, workers=2))
    run = RelayRun(path).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, r"\[w0\].*ready \(pid")
        await asyncio.to_thread(run.wait_for, r"\[w1\].*ready \(pid")
        for _ in range(6):
            await send(smtp_port)
        await until(lambda: len(sink.messages) == 6)
        # the doorbell: a message is delivered by the worker that did not accept it (only the
        # periodic rescan, racing the doorbell by a millisecond, could pick one up itself)
        accepted = {
            queue_id: worker
            for worker, queue_id in re.findall(r"\[(w\d)\] relay\.front: (\w+): accepted", run.log)
        }
        delivered = {
            queue_id: worker
            for worker, queue_id in re.findall(r"\[(w\d)\] relay\.scheduler: \[(\w+)\] done", run.log)
        }
        assert len(accepted) == 6 and delivered.keys() == accepted.keys()
        assert sum(delivered[q] != accepted[q] for q in accepted) >= 5, run.log
        assert (await asyncio.to_thread(http_get, metrics_port, "/readyz"))[0] == 200
        _, body = await asyncio.to_thread(http_get, metrics_port, "/metrics")
        assert 'mailrelay_messages_accepted_total{listener="smtp"} 6.0' in body
        run.signal(signal.SIGHUP)
        await asyncio.to_thread(run.wait_for, "forwarded to 2 workers")
        run.signal(signal.SIGTERM)
        assert await asyncio.to_thread(run.wait, 60) == 0
    finally:
        await sink.stop()


@pytest.mark.parametrize("allowed", [{0}, None], ids=["one-cpu", "every-cpu"])
async def test_workers_auto_starts_one_worker_per_cpu_the_relay_may_use(
    tmp_path: Path, runs: list[RelayRun], allowed: set[int] | None
) -> None:
    """No `workers` in the file: as many processes as CPUs in the relay's affinity mask."""
    cpus = allowed or os.sched_getaffinity(0)
    sink = await SmtpSink().start()
    smtp_port, metrics_port = free_port(), free_port()
    config = relay_config(tmp_path, smtp_port, metrics_port, sink.port)
    config.pop("workers", None)
    run = RelayRun(write_config(tmp_path, config), cpus=set(cpus)).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, rf"workers: auto = {len(cpus)} ")
        if len(cpus) == 1:
            await asyncio.to_thread(run.wait_for, r"ready \(pid")
            assert "[w0]" not in run.log
        else:
            await asyncio.to_thread(run.wait_for, rf"\[w{len(cpus) - 1}\].*ready \(pid")
        await send(smtp_port)
        await until(lambda: len(sink.messages) == 1)
        run.signal(signal.SIGTERM)
        assert await asyncio.to_thread(run.wait, 60) == 0
    finally:
        await sink.stop()


def test_config_watcher_sees_a_symlink_swap(tmp_path: Path) -> None:
    configmap = ConfigMapDir(tmp_path)
    configmap.publish("hostname: a\n")
    calls: list[int] = []
    watcher = ConfigWatcher(configmap.path, lambda: calls.append(1))
    assert not watcher.check()
    configmap.publish("hostname: a\n")  # same content, new target: a change all the same
    assert watcher.check() and calls == [1]
    assert not watcher.check()
    (configmap.directory / "..data").unlink()  # mid-swap: the file is gone for a moment
    assert not watcher.check()


def test_sighup_while_starting_does_not_kill_the_relay(tmp_path: Path, runs: list[RelayRun]) -> None:
    # A reload may be signalled at any moment once the relay runs, also before its event loop is up
    # (the relay's first log line is printed before the spool recovery and the loop start).
    path = write_config(tmp_path, relay_config(tmp_path, free_port(), free_port(), free_port()))
    run = RelayRun(path).start()
    runs.append(run)
    assert run.process is not None
    run.wait_for(".")
    signals_sent = 0
    deadline = time.monotonic() + 60
    while True:  # at least one SIGHUP, however fast the relay starts
        run.signal(signal.SIGHUP)
        signals_sent += 1
        if run.count(r"ready \(pid"):
            break
        assert time.monotonic() < deadline, f"relay not ready after {signals_sent} SIGHUPs:\n{run.log}"
        assert run.process.poll() is None, f"relay died after {signals_sent} SIGHUPs:\n{run.log}"
        time.sleep(0.02)
    assert run.process.poll() is None
