"""SIGKILL of a relay under load, several rounds: every message answered 250 arrives at the next
hop (none lost); duplicates are counted and reported, never hidden.

Six clients send continuously while the relay process is killed with SIGKILL in the middle of
sessions, spool writes and deliveries; the relay is started again on the same spool and the
load resumes. At the end every token the relay answered 250 for must be at the sink."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.faults.harness import Relay, delivery_figures, record_figures, relay_config, running_sink, send_one
from tests.relay.apphelp import free_port

ROUNDS = 4
PER_ROUND = 25  # 250s to see before each kill
CLIENTS = 6


class Load:
    def __init__(self, port: int) -> None:
        self.port = port
        self.attempted = 0
        self.accepted: set[str] = set()
        self.failed: set[str] = set()  # no 250 seen (refused, reset, killed mid-transaction)
        self.stop = asyncio.Event()

    async def client(self, round_no: int, client: int) -> None:
        i = 0
        while not self.stop.is_set():
            token = f"r{round_no}-c{client}-{i}"
            i += 1
            self.attempted += 1
            try:
                await send_one(self.port, token, timeout=20)
            except Exception:
                self.failed.add(token)
                await asyncio.sleep(0.05)  # the relay is down: pace the retries
            else:
                self.accepted.add(token)

    async def round(self, round_no: int, relay: Relay) -> int:
        self.stop.clear()
        before = len(self.accepted)
        tasks = [asyncio.create_task(self.client(round_no, c)) for c in range(CLIENTS)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while len(self.accepted) - before < PER_ROUND:
            assert loop.time() < deadline, "the relay stopped accepting mail"
            await asyncio.sleep(0.02)
        relay.sigkill()  # in the middle of whatever the six sessions and the scheduler do
        self.stop.set()
        await asyncio.gather(*tasks)
        return len(self.accepted) - before


async def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    with running_sink() as sink:
        relay = Relay(tmp_path, relay_config(tmp_path, smtp_port=free_port(), next_hop_port=sink.port))
        load = Load(relay.port)
        try:
            for round_no in range(ROUNDS):
                await relay.astart()
                await load.round(round_no, relay)
                assert relay.run.process is not None
                assert relay.run.process.returncode == -signal.SIGKILL
            await relay.astart()
            await asyncio.to_thread(sink.wait_tokens, load.accepted, 120)
            await asyncio.to_thread(relay.wait_queue_empty, 60)
            relay.run.signal(signal.SIGTERM)
            assert await asyncio.to_thread(relay.run.wait, 30) == 0
            arrived = sink.tokens()
            lost = load.accepted - set(arrived)
            unconfirmed = set(arrived) - load.accepted
            record_figures(
                "faults.sigkill_under_load",
                rounds=ROUNDS,
                clients=CLIENTS,
                sent=load.attempted,
                **delivery_figures(load.accepted, arrived),
                delivered_without_250=len(unconfirmed),
                arrivals=sum(arrived.values()),
            )
            assert not lost, f"accepted with 250 but never delivered: {sorted(lost)}"
            assert len(load.accepted) >= ROUNDS * PER_ROUND
            # a message nobody answered 250 for may arrive (the kill came after the commit and
            # before the reply) but it must be one the clients really sent
            assert unconfirmed <= load.failed
            relay.assert_no_traceback()
        finally:
            relay.stop()
