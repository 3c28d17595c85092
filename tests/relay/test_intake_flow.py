"""Intake flow control (Postfix's in_flow_delay): the front's 250 waits while new mail piles up
in front of the scheduler's delivery slots, and never before the message is durable."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from relay.spool import Spool
from tests.relay.fronthelp import make_config as front_config
from tests.relay.fronthelp import running_front
from tests.relay.test_scheduler import Harness, make_config, relay_hop, store


class SilentServer:
    """Accepts connections and never greets: every delivery to it hangs until its timeout."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> int:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            await reader.read()  # until the client gives up
            writer.close()

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    await harness.close()


@pytest.fixture
async def silent() -> AsyncIterator[tuple[SilentServer, int]]:
    server = SilentServer()
    port = await server.start()
    yield server, port
    await server.stop()


def delayed_count() -> float:
    return REGISTRY.get_sample_value("mailrelay_intake_delayed_total") or 0.0


async def test_room_closes_when_new_mail_waits_for_slots_and_opens_when_one_is_taken(
    h: Harness, silent: tuple[SilentServer, int]
) -> None:
    _server, port = silent
    config = make_config(
        h.tmp_path, [{"name": "all", "nextHop": relay_hop(port)}], maxConcurrency=2, commandTimeout="2s"
    )
    scheduler = await h.scheduler(config)
    ids = [await store(h.spool, ["a@dest.test"]) for _ in range(4)]
    assert await scheduler.room_for_intake(timeout=0.01)
    for queue_id in ids:
        scheduler.notify(queue_id)  # two go in flight and hang; two wait for a slot
    await asyncio.sleep(0)
    before = delayed_count()
    assert await scheduler.room_for_intake(timeout=0.05) is False  # held, then answered anyway
    assert delayed_count() == before + 1
    # the hung deliveries time out (commandTimeout 2 s) and free their slots: room again
    assert await scheduler.room_for_intake(timeout=30) is True


async def test_a_backlog_of_due_deferred_mail_does_not_hold_new_mail(
    h: Harness, silent: tuple[SilentServer, int]
) -> None:
    _server, port = silent
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(port)}], maxConcurrency=2)
    for _ in range(6):  # already queued when the relay starts: found by the scan, not notified
        await store(h.spool, ["a@dest.test"])
    scheduler = await h.scheduler(config)
    await asyncio.sleep(0)
    assert await scheduler.room_for_intake(timeout=0.01) is True


async def test_the_front_stores_first_and_answers_250_only_after_the_gate(tmp_path: Path) -> None:
    config = front_config(tmp_path, trustedNetworks=["127.0.0.0/8"])
    gate = asyncio.Event()
    gate_reached = asyncio.Event()

    async def intake_gate() -> None:
        gate_reached.set()
        await gate.wait()

    spool = Spool(tmp_path / "queue", fsync=False)
    spool.prepare()
    async with running_front(config, spool, intake_gate=intake_gate) as front:
        host, port = front.addresses["smtp"]

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP(host, port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("s@sender.test")
                client.rcpt("a@example.com")
                return client.data(b"Subject: held\r\n\r\nbody\r\n")

        sending = asyncio.create_task(asyncio.to_thread(send))
        await asyncio.wait_for(gate_reached.wait(), 30)
        assert len(spool.ids("incoming")) == 1  # durable before the gate
        assert not sending.done()  # and no reply yet
        gate.set()
        code, text = await asyncio.wait_for(sending, 30)
        assert code == 250 and b"queued as" in text
    spool.close()
