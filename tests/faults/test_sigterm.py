"""SIGTERM with a full queue, deliveries in flight and sessions in every state: transactions in
flight finish (250) or get ``421``, idle sessions and new connections get ``421``, the process
exits 0 within its grace period, and after a restart everything answered 250 is delivered."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.faults.harness import (
    RawSession,
    Relay,
    delivery_figures,
    message_with_token,
    record_figures,
    relay_config,
    running_sink,
    send_one,
)
from tests.relay.apphelp import free_port

QUEUED = 30
GRACE = 6.0


def open_session(port: int) -> RawSession:
    session = RawSession.connect(port)
    assert session.reply()[0] == 220
    assert session.cmd("EHLO client.test")[0] == 250
    return session


async def test_sigterm_with_a_full_queue_and_open_sessions(tmp_path: Path) -> None:
    with running_sink() as sink:
        sink.stop()  # the next hop is down: the queue fills up
        relay = Relay(
            tmp_path, relay_config(tmp_path, smtp_port=free_port(), next_hop_port=sink.port), grace=GRACE
        )
        accepted: set[str] = set()
        try:
            await relay.astart()
            for i in range(QUEUED):
                await send_one(relay.port, f"queued-{i}")
                accepted.add(f"queued-{i}")
            await asyncio.to_thread(relay.run.wait_for, "deferred 1 recipients", occurrences=QUEUED)
            # the hop comes back slow: the retries are in flight when SIGTERM arrives
            sink.data_delay = 2.0
            sink.start()
            await asyncio.to_thread(sink.wait, lambda s: s.transactions >= 1, 30)

            in_data = open_session(relay.port)
            assert in_data.cmd("MAIL FROM:<sender@sender.test>")[0] == 250
            assert in_data.cmd("RCPT TO:<user@example.com>")[0] == 250
            assert in_data.cmd("DATA")[0] == 354
            body = message_with_token("in-data")
            in_data.send(body[:40])
            in_mail = open_session(relay.port)
            assert in_mail.cmd("MAIL FROM:<sender@sender.test>")[0] == 250
            idle = open_session(relay.port)

            relay.run.signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            await asyncio.to_thread(relay.run.wait_for, "shutting down")
            idle_replies = await asyncio.to_thread(idle.replies_until_closed)
            in_data.send(body[40:] + b".\r\n")
            data_code = (await asyncio.to_thread(in_data.reply))[0]
            if data_code == 250:
                accepted.add("in-data")
            rcpt_code = (await asyncio.to_thread(in_mail.cmd, "RCPT TO:<user@example.com>"))[0]
            assert await asyncio.to_thread(relay.run.wait, GRACE + 20) == 0
            exit_seconds = time.monotonic() - stopped_at
            for session in (in_data, in_mail, idle):
                session.close()
            assert [code for code, _ in idle_replies] == [421]
            assert data_code in (250, 421)
            assert rcpt_code in (250, 421)

            sink.data_delay = 0.0
            await relay.astart()
            await asyncio.to_thread(sink.wait_tokens, accepted, 60)
            await asyncio.to_thread(relay.wait_queue_empty, 60)
            relay.run.signal(signal.SIGTERM)
            assert await asyncio.to_thread(relay.run.wait, 30) == 0
            arrived = sink.tokens()
            record_figures(
                "faults.sigterm_full_queue",
                sent=QUEUED + 1,
                **delivery_figures(accepted, arrived),
                in_data_reply=data_code,
                idle_session_reply=idle_replies[0][0],
                grace_seconds=GRACE,
                exit_seconds=round(exit_seconds, 1),
            )
            assert set(arrived) == accepted
            assert exit_seconds < GRACE + 10
            relay.assert_no_traceback()
        finally:
            relay.stop()
