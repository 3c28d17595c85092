"""kill -9 in the middle of a scale-down hand-off (issue 14), on both sides: the draining relay
while it hands its queue off, then the receiving peer while it takes it. Nothing is lost, and
because the peer keeps a queue id it already holds once, nothing arrives twice either: once the
next hop is back, every message arrives exactly once.

Real relay processes on loopback; the next hop is down during the hand-off (a long backoff
keeps either side from retrying on its own), then an SMTP sink comes up and the peer's queue
is made due (`mailrelay queue retry`)."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

from relay.spool import Spool
from tests.relay.apphelp import RelayRun, free_port, until
from tests.relay.handoffhelp import Peers, Pod, send_dsn_message
from tests.relay.smtpsink import SmtpSink

MESSAGES = 200


async def _kill_when(pod_to_kill: Pod, watched: Pod, reached: int) -> int:
    """kill -9 `pod_to_kill` once `watched` holds at least `reached` messages; what it held then."""
    while True:
        held = watched.queued()
        if held >= reached:
            pod_to_kill.run.kill()
            return held
        await asyncio.sleep(0.005)


async def test_kill_9_on_either_side_mid_handoff_loses_and_duplicates_nothing(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    sink_port = free_port()
    retry = {"minBackoff": "1h", "maxBackoff": "2h", "maxLifetime": "5d"}
    peers = Peers(tmp_path, sink_port, ["edge-0", "edge-1"], retry=retry)
    peers.start(runs)
    keep, going = peers["edge-0"], peers["edge-1"]
    tokens = [f"kill{i}" for i in range(MESSAGES)]
    for start in range(0, MESSAGES, 10):
        await asyncio.gather(*(send_dsn_message(going.smtp_port, t) for t in tokens[start : start + 10]))
    await until(lambda: going.counts()["deferred"] == MESSAGES, timeout=120)
    ids = going.ids("deferred")

    peers.drain(["edge-1"])
    at_first_kill = await _kill_when(going, keep, 10)  # the sender, mid hand-off
    going.start(runs)  # recovers active/ into incoming/, still draining: goes on
    at_second_kill = await _kill_when(keep, keep, min(at_first_kill + 20, MESSAGES))  # the receiver
    keep.start(runs)
    await until(lambda: going.queued() == 0, timeout=180)
    await until(lambda: keep.ids("deferred") == ids, timeout=60)
    print(f"kill -9 of the sender at {at_first_kill}, of the receiver at {at_second_kill} of {MESSAGES}")
    assert keep.queued() == MESSAGES  # no copy twice in the peer's spool

    sink = await SmtpSink(port=sink_port).start()
    try:
        spool = Spool(keep.spool)
        for queue_id in ids:
            assert spool.retry_now(queue_id)
        await until(lambda: len(sink.messages) >= MESSAGES, timeout=180)
        await until(lambda: keep.queued() == 0, timeout=60)
        await asyncio.sleep(1.0)  # a duplicate would come now
        arrived = collections.Counter(
            m.content.split(b"X-Token: ")[1].split(b"\r\n")[0].decode() for m in sink.messages
        )
        assert set(arrived) == set(tokens), "lost: " + ", ".join(sorted(set(tokens) - set(arrived)))
        assert max(arrived.values()) == 1, f"duplicates: {[t for t, n in arrived.items() if n > 1]}"
    finally:
        await sink.stop()
    for run in (*going.runs, *keep.runs):
        assert "Traceback" not in run.log, run.log[-4000:]
