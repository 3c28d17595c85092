"""Operating a relay (issue 2, "Operating it"): /readyz says 503 when the spool is not writable,
the listeners are not bound or a worker is down; a SIGKILLed worker is restarted by its parent
while the port keeps serving; /metrics of a real running relay counts accepted mail, refusals by
reason, delivered/deferred/bounced recipients and delivery latency per route, and the queue
depth by state; SIGTERM with a full queue and a hanging next hop exits within the grace period
and leaves every message on disk. Real sockets on 127.0.0.1, relays as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import aiosmtplib
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from relay.cli import main
from relay.spool import Spool
from tests.relay.apphelp import (
    RelayRun,
    free_port,
    http_get,
    in_process,
    relay_to_sink_config,
    until,
    write_config,
)
from tests.relay.fronthelp import RawClient
from tests.relay.smtpsink import SmtpSink

MESSAGE = b"Subject: operating\r\nFrom: a@example.com\r\n\r\nhello\r\n"


def config_data(tmp_path: Path, smtp_port: int, metrics_port: int, **extra: Any) -> dict[str, Any]:
    """The next hop is a port nothing listens on until a test points it at its sink."""
    return relay_to_sink_config(
        tmp_path,
        hostname="ops.relay.test",
        domains=["example.com"],
        smtp_port=smtp_port,
        metrics_port=metrics_port,
        sink_port=free_port(),
        **extra,
    )


async def get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)


def samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels without pid) -> value (summed)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            key = (sample.name, labels)
            out[key] = out.get(key, 0.0) + sample.value
    return out


async def send(port: int, recipients: list[str], sender: str = "a@example.com") -> str:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    _errors, text = await smtp.sendmail(sender, recipients, MESSAGE)
    await smtp.quit()
    return text


async def test_readyz_is_503_when_the_spool_is_not_writable_or_a_listener_is_gone(tmp_path: Path) -> None:
    metrics_port = free_port()
    path = write_config(tmp_path, config_data(tmp_path, free_port(), metrics_port))
    async with in_process(path, serve_health=True) as process:
        assert await get(metrics_port, "/readyz") == (200, "ready\n")
        # the spool cannot take a file (what a read-only or broken volume does; root ignores modes)
        tmp = tmp_path / "queue" / "tmp"
        tmp.rename(tmp_path / "queue" / "tmp.away")
        tmp.write_text("")
        assert await get(metrics_port, "/readyz") == (503, "not ready: spool not writable\n")
        assert await get(metrics_port, "/healthz") == (200, "ok\n")  # alive all the same
        tmp.unlink()
        (tmp_path / "queue" / "tmp.away").rename(tmp)
        assert await get(metrics_port, "/readyz") == (200, "ready\n")
        # a listener that is not bound any more
        assert process.front is not None
        server = process.front.listeners["smtp"].server
        assert server is not None
        server.close()
        assert await get(metrics_port, "/readyz") == (503, "not ready: listeners not bound\n")


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    sink = await SmtpSink().start()
    smtp_port, metrics_port = free_port(), free_port()
    data = config_data(tmp_path, smtp_port, metrics_port, workers=2)
    data["routes"][0]["nextHop"]["port"] = sink.port
    run = RelayRun(write_config(tmp_path, data)).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, r"\[w0\].*ready \(pid")
        await asyncio.to_thread(run.wait_for, r"\[w1\].*ready \(pid")

        async def ready() -> bool:
            # a worker logs "ready" just before it signals the parent
            return (await get(metrics_port, "/readyz"))[0] == 200

        await until(ready)
        line = run.wait_for(r"worker 0 started \(pid \d+\)")
        pid = int(re.search(r"pid (\d+)", line).group(1))  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(run.wait_for, r"worker 0 \(pid \d+\) exited with -9; restarting")

        async def not_ready() -> bool:
            return await get(metrics_port, "/readyz") == (503, "not ready: worker 0 not ready\n")

        await until(not_ready)  # while a worker is down the pod is not ready
        # the other worker keeps serving the port while worker 0 comes back
        for _ in range(3):
            assert (await send(smtp_port, ["user@example.com"])).startswith("2.0.0")
        await asyncio.to_thread(run.wait_for, r"worker 0 started \(pid \d+\)", occurrences=2)
        await asyncio.to_thread(run.wait_for, r"\[w0\].*ready \(pid", occurrences=2)
        new_line = run.wait_for(r"worker 0 started \(pid \d+\)", occurrences=2)
        assert f"pid {pid})" not in new_line

        await until(ready)
        for _ in range(3):
            assert (await send(smtp_port, ["user@example.com"])).startswith("2.0.0")

        async def all_arrived() -> bool:
            return len(sink.messages) == 6

        await until(all_arrived)

        # gauges of the shared spool: one value per state, not one per (dead or live) worker
        async def depth_scraped() -> bool:
            body = (await get(metrics_port, "/metrics"))[1]
            return 'mailrelay_queue_messages{state="incoming"}' in body

        await until(depth_scraped)
        body = (await get(metrics_port, "/metrics"))[1]
        depth = [line for line in body.splitlines() if line.startswith("mailrelay_queue_messages{")]
        assert len(depth) == 5 and not any("pid=" in line for line in depth), depth
        sessions = [line for line in body.splitlines() if line.startswith("mailrelay_smtp_sessions{")]
        assert sessions and not any("pid=" in line for line in sessions), sessions
        run.signal(signal.SIGTERM)
        assert await asyncio.to_thread(run.wait, 60) == 0
    finally:
        await sink.stop()


async def test_metrics_of_a_running_relay(tmp_path: Path, runs: list[RelayRun]) -> None:
    sink = await SmtpSink(rcpt_replies={"nobody@example.com": "550 5.1.1 no such user"}).start()
    smtp_port, metrics_port = free_port(), free_port()
    data = config_data(tmp_path, smtp_port, metrics_port, acceptDomains=["example.com", "later.example"])
    data["routes"][0]["nextHop"]["port"] = sink.port
    data["routes"].append(
        {
            "name": "to-nowhere",
            "match": {"recipientDomains": ["later.example"]},
            "nextHop": {"kind": "relay", "name": "down", "host": "127.0.0.1", "port": free_port()},
        }
    )
    run = RelayRun(write_config(tmp_path, data)).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid")
        text = await send(smtp_port, ["user@example.com", "nobody@example.com", "wait@later.example"])
        queue_id = text.rsplit(" ", 1)[1]
        client = await RawClient.connect("127.0.0.1", smtp_port)
        await client.reply()
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@example.com>")
        assert (await client.cmd("RCPT TO:<victim@evil.test>"))[0] == 554
        await client.cmd("QUIT")
        await client.close()

        expected = {
            ("mailrelay_messages_accepted_total", (("listener", "smtp"),)): 1.0,
            ("mailrelay_rejected_total", (("reason", "relay_denied"),)): 1.0,
            ("mailrelay_recipients_delivered_total", (("route", "to-sink"),)): 2.0,  # user + the DSN
            ("mailrelay_recipients_bounced_total", (("route", "to-sink"),)): 1.0,
            ("mailrelay_delivery_seconds_count", (("route", "to-sink"),)): 2.0,
            ("mailrelay_queue_messages", (("state", "deferred"),)): 1.0,
            ("mailrelay_queue_messages", (("state", "incoming"),)): 0.0,
        }
        scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        async def counted() -> bool:
            nonlocal scraped
            scraped = samples((await get(metrics_port, "/metrics"))[1])
            deferred = scraped.get(("mailrelay_recipients_deferred_total", (("route", "to-nowhere"),)), 0)
            return deferred >= 1 and all(scraped.get(key) == value for key, value in expected.items())

        try:
            await until(counted)
        except AssertionError:
            raise AssertionError(f"metrics not as expected: {scraped}") from None
        assert ("mailrelay_delivery_seconds_bucket", (("le", "+Inf"), ("route", "to-sink"))) in scraped

        # the DSN about nobody@ went back to the sender through the same route
        async def both_arrived() -> bool:
            return len(sink.messages) == 2

        await until(both_arrived)
        assert {m.mail_from for m in sink.messages} == {"a@example.com", ""}
        # every log line about the message carries its queue id
        about = [line for line in run.lines if "wait@later.example" in line or "nobody@example.com" in line]
        assert about and all(queue_id in line for line in about), about
    finally:
        await sink.stop()


async def test_sigterm_with_a_full_queue_and_a_hanging_next_hop(tmp_path: Path, runs: list[RelayRun]) -> None:
    """The next hop accepts connections and never answers: deliveries hang. SIGTERM exits 0
    within the grace period; every accepted message is still on disk and delivered after a
    restart."""
    hanging: list[asyncio.StreamWriter] = []

    async def never_answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hanging.append(writer)

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    smtp_port, metrics_port = free_port(), free_port()
    data = config_data(tmp_path, smtp_port, metrics_port)
    data["routes"][0]["nextHop"]["port"] = silent_port
    path = write_config(tmp_path, data)
    run = RelayRun(path, grace=2.0).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid")
        ids = {(await send(smtp_port, [f"u{i}@example.com"])).rsplit(" ", 1)[1] for i in range(8)}

        async def connected() -> bool:
            return bool(hanging)

        await until(connected)  # a delivery is stuck waiting for the greeting
        run.signal(signal.SIGTERM)
        assert await asyncio.to_thread(run.wait, 15) == 0  # grace 2 s: well before the 30 s timeout
        assert "stopped; the queue stays in" in run.log
        spool = Spool(tmp_path / "queue")
        on_disk = {q for state in ("incoming", "active", "deferred") for q in spool.ids(state)}
        spool.close()
        assert on_disk == ids
    finally:
        silent.close()
        for writer in hanging:
            writer.close()
    # the next start delivers every one of them
    sink = await SmtpSink().start()
    try:
        data["routes"][0]["nextHop"]["port"] = sink.port
        write_config(tmp_path, data)
        again = RelayRun(path).start()
        runs.append(again)

        async def delivered() -> bool:
            return len(sink.messages) == len(ids)

        await until(delivered)
        assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted(
            f"u{i}@example.com" for i in range(8)
        )
        again.signal(signal.SIGTERM)
        assert await asyncio.to_thread(again.wait, 30) == 0
    finally:
        await sink.stop()


def queue_cli(config: Path, *args: str) -> Result:
    """`mailrelay queue ARGS --config FILE` (in this process; the relay is another process)."""
    return CliRunner().invoke(main, ["queue", *args, "--config", str(config)])


async def queue_op(config: Path, *args: str) -> str:
    """An admin command on a running relay's spool. A message the scheduler holds in active/ at
    that instant is not waiting (exit 1); the operator simply tries again."""
    for _ in range(20):
        result = await asyncio.to_thread(queue_cli, config, *args)
        if result.exit_code == 0:
            return result.output
        assert "no message" in result.output, result.output
        await asyncio.sleep(0.05)
    raise AssertionError(f"queue {args} kept failing")


async def test_queue_commands_on_a_running_relay(tmp_path: Path, runs: list[RelayRun]) -> None:
    """hold, delete, retry and list while the scheduler keeps retrying the same messages."""
    smtp_port, metrics_port, hop_port = free_port(), free_port(), free_port()
    data = config_data(tmp_path, smtp_port, metrics_port)
    data["routes"][0]["nextHop"]["port"] = hop_port  # down for now
    path = write_config(tmp_path, data)
    run = RelayRun(path).start()
    runs.append(run)
    sink: SmtpSink | None = None
    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid")
        ids = {}
        for name in ("held", "deleted", "kept"):
            ids[name] = (await send(smtp_port, [f"{name}@example.com"])).rsplit(" ", 1)[1]

        async def all_deferred() -> bool:
            result = await asyncio.to_thread(queue_cli, path, "list", "--json")
            rows = [json.loads(line) for line in result.output.splitlines()]
            return len(rows) == 3 and all(row["attempts"] >= 1 for row in rows)

        await until(all_deferred)
        await queue_op(path, "hold", ids["held"])
        await queue_op(path, "delete", ids["deleted"])
        listing = await asyncio.to_thread(queue_cli, path, "list")
        assert f"{ids['held']}  hold" in listing.output and ids["deleted"] not in listing.output
        sink = await SmtpSink(port=hop_port).start()

        async def kept_arrived() -> bool:
            return sink is not None and [m.rcpt_tos for m in sink.messages] == [["kept@example.com"]]

        await until(kept_arrived)  # the next retry (backoff 1-2 s) delivers the message not held
        assert Spool(tmp_path / "queue").ids("hold") == [ids["held"]]
        await queue_op(path, "retry", ids["held"])

        async def held_arrived() -> bool:
            return sink is not None and len(sink.messages) == 2

        await until(held_arrived)
        assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
            "held@example.com",
            "kept@example.com",
        ]
        final = await asyncio.to_thread(queue_cli, path, "list")
        assert final.output.strip() == "queue is empty"
        assert not list((tmp_path / "queue" / "corrupt").iterdir())
        run.signal(signal.SIGTERM)
        assert await asyncio.to_thread(run.wait, 30) == 0
    finally:
        if sink is not None:
            await sink.stop()
