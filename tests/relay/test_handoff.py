"""Scale-down drain and hand-off between real relay processes (issue 14): a pod named in
``drain.pods`` stops taking mail (/readyz 503, new sessions 421 4.3.2), hands its deferred and
held mail to a peer's handoff listener with the queue state intact (queue id, first arrival,
attempts, hold, DSN parameters), adds no Received header, reports GET /queue, and takes mail
again when the drain is withdrawn. The handoff listener refuses anyone without the credential
and keeps a repeated hand-off once."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

from relay.config import HandoffPeer
from relay.core.handoff import encode_entry
from relay.core.model import Envelope, Message, QueueEntry, Recipient
from relay.handoff import HandoffClient, PeerUnavailable
from relay.spool import Spool, new_queue_id
from tests.relay.apphelp import RelayRun, free_port, http_get, until
from tests.relay.fronthelp import RawClient
from tests.relay.handoffhelp import SECRET, Peers, send_dsn_message
from tests.relay.smtpsink import SmtpSink

MESSAGES = 6


async def test_draining_pod_hands_its_queue_to_a_peer_with_the_queue_state(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    sink_port = free_port()  # the next hop is down: nothing listens there yet
    # a long backoff: no attempt while the test looks, so attempts and next attempt must travel
    retry = {"minBackoff": "1h", "maxBackoff": "2h", "maxLifetime": "5d"}
    peers = Peers(tmp_path, sink_port, ["edge-0", "edge-1"], retry=retry)
    peers.start(runs)
    keep, going = peers["edge-0"], peers["edge-1"]
    tokens = [f"tok{i}" for i in range(MESSAGES)]
    for token in tokens:
        await send_dsn_message(going.smtp_port, token)
    await until(lambda: going.counts()["deferred"] == MESSAGES, timeout=60)
    # an operator holds one (`mailrelay queue hold`): it must stay held on the peer
    held_id = sorted(going.ids("deferred"))[0]
    assert Spool(going.spool).hold(held_id)
    before = going.headers()
    assert all(entry.attempts >= 1 for _state, entry in before.values())
    assert (await asyncio.to_thread(going.queue))["draining"] is False

    peers.drain(["edge-1"])
    await asyncio.to_thread(going.run.wait_for, "draining \\(pod edge-1 is in drain.pods\\)")
    status, body = await asyncio.to_thread(http_get, going.metrics_port, "/readyz")
    assert (status, body.strip()) == (503, "not ready: draining")
    client = await RawClient.connect("127.0.0.1", going.smtp_port)
    code, text = await client.reply()
    assert (code, text.split()[0]) == (421, "4.3.2")
    await client.close()
    assert (await asyncio.to_thread(http_get, keep.metrics_port, "/readyz"))[0] == 200

    await until(lambda: going.queued() == 0, timeout=60)
    report = await asyncio.to_thread(going.queue)
    assert report["pod"] == "edge-1" and report["draining"] is True
    assert (report["depth"], report["handedOff"], report["drained"]) == (0, MESSAGES, True)
    after = keep.headers()
    assert set(after) == set(before)  # the same queue ids
    for queue_id, (_state, entry) in before.items():
        new_state, moved = after[queue_id]
        assert new_state == ("hold" if queue_id == held_id else "deferred")
        assert moved.arrival == entry.arrival and moved.attempts == entry.attempts
        assert moved.envelope == entry.envelope and moved.pending == entry.pending
        assert moved.next_attempt == entry.next_attempt and moved.results == entry.results
    assert going.run.count("handed off to") == MESSAGES
    sent = await asyncio.to_thread(going.metric, "mailrelay_handoff_messages_total", result="sent")
    taken = await asyncio.to_thread(keep.metric, "mailrelay_handoff_messages_total", result="received")
    assert (sent, taken) == (MESSAGES, MESSAGES)
    assert await asyncio.to_thread(keep.metric, "mailrelay_queue_depth") == MESSAGES
    assert await asyncio.to_thread(keep.metric, "mailrelay_queue_oldest_age_seconds") > 0

    # the next hop comes back: the peer delivers everything but the held message, once each,
    # with the DSN parameters and no Received header added by the hand-off
    sink = await SmtpSink(port=sink_port, dsn=True).start()
    try:
        for queue_id in keep.ids("deferred"):  # `mailrelay queue retry`: due now
            assert Spool(keep.spool).retry_now(queue_id)
        await until(lambda: len(sink.messages) >= MESSAGES - 1, timeout=60)
        await asyncio.sleep(1.0)
        delivered = sorted(m.content.split(b"X-Token: ")[1].split(b"\r\n")[0].decode() for m in sink.messages)
        held_token = before[held_id][1].envelope.envid
        assert delivered == sorted(t for t in tokens if t != held_token)
        for message in sink.messages:
            assert message.content.count(b"Received:") == 1  # edge-1's own hop only
            assert message.dsn_mail["RET"] == "HDRS"
            assert message.dsn_rcpt["user@example.com"]["NOTIFY"] == "FAILURE,DELAY"
            assert message.dsn_rcpt["user@example.com"]["ORCPT"] == "rfc822;user@example.com"
        assert keep.ids("hold") == {held_id}
    finally:
        await sink.stop()

    # the drain is withdrawn: the pod takes mail again
    peers.drain([])
    await asyncio.to_thread(going.run.wait_for, "drain ended")
    await until(lambda: http_get(going.metrics_port, "/readyz")[0] == 200, timeout=30)
    assert "queued as" in await send_dsn_message(going.smtp_port, "again")


ARRIVAL = time.time() - 600


def _entry(
    rcpt: str = "user@example.com", *, arrival: float = ARRIVAL, due: float | None = None
) -> QueueEntry:
    recipient = Recipient(rcpt, notify=("FAILURE",))
    return QueueEntry(
        queue_id=new_queue_id(),
        envelope=Envelope("a@sender.test", (recipient,), envid="e1", ret="FULL"),
        arrival=arrival,
        pending=(recipient,),
        attempts=3,
        next_attempt=time.time() + 3600 if due is None else due,
    )


async def test_handoff_listener_refuses_strangers_and_keeps_a_repeated_handoff_once(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    retry = {"minBackoff": "1h", "maxBackoff": "2h", "maxLifetime": "1d"}
    peers = Peers(tmp_path, free_port(), ["edge-0"], retry=retry)
    peers.start(runs)
    pod = peers["edge-0"]
    peer = HandoffPeer(host="127.0.0.1", port=pod.handoff_port)

    stranger = await RawClient.connect("127.0.0.1", pod.handoff_port)
    await stranger.reply()
    assert (await stranger.cmd("EHLO stranger.test"))[0] == 250
    assert (await stranger.cmd("MAIL FROM:<a@b.test>"))[0] == 530
    code, text = await stranger.cmd("AUTH PLAIN " + base64.b64encode(b"\0handoff\0guess").decode())
    assert (code, text.split()[0]) == (535, "5.7.8")
    await stranger.close()
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret\n")
    message = Message(_entry(), b"Subject: x\r\n\r\nbody\r\n")
    try:
        await HandoffClient("test", wrong).send(peer, message)
        raise AssertionError("a wrong credential was accepted")
    except PeerUnavailable as exc:
        assert "535" in str(exc)
    assert await asyncio.to_thread(pod.metric, "mailrelay_handoff_refused_total", reason="auth") >= 2
    assert await asyncio.to_thread(pod.metric, "mailrelay_handoff_refused_total", reason="auth_required") == 1

    # the queue parameter is refused on the mail listener, as any unknown parameter
    mail = await RawClient.connect("127.0.0.1", pod.smtp_port)
    await mail.reply()
    await mail.cmd("EHLO client.test")
    assert (await mail.cmd("MAIL FROM:<a@b.test> XQUEUE=abc"))[0] == 555
    await mail.close()

    pod.publish(limits={"idleTimeout": "1s"})  # the kept session is closed by the peer between
    await asyncio.to_thread(pod.run.wait_for, "config reloaded")
    client = HandoffClient("test", peers.credential)
    try:
        assert await client.send(peer, message) is None
        assert await client.send(peer, message) is None  # repeated after a crash: kept once
        await until(lambda: pod.queued() == 1, timeout=30)
        assert await asyncio.to_thread(pod.metric, "mailrelay_handoff_duplicates_total") == 1
        await asyncio.to_thread(pod.run.wait_for, "handoff 127.0.0.1: idle timeout")
        assert await client.send(peer, message) is None  # a new session after the peer closed it
        assert await asyncio.to_thread(pod.metric, "mailrelay_handoff_duplicates_total") == 2
        stored = pod.headers()[message.entry.queue_id][1]
        assert (stored.arrival, stored.attempts, stored.envelope) == (ARRIVAL, 3, message.entry.envelope)
        # maxLifetime counts from the first acceptance: a message first accepted two days ago
        # (lifetime 1d) bounces on its first attempt here, with a DSN to its sender
        old = Message(_entry(arrival=time.time() - 2 * 86400, due=0.0), b"Subject: old\r\n\r\nbody\r\n")
        assert await client.send(peer, old) is None
        await until(lambda: old.entry.queue_id not in pod.headers() and pod.queued() == 2, timeout=30)
        assert any(entry.envelope.mail_from == "" for _state, entry in pod.headers().values())
        await asyncio.to_thread(pod.run.wait_for, "4.4.7")
    finally:
        await client.close()

    # an envelope that is not the entry's is refused after the content, and nothing is stored
    raw = await RawClient.connect("127.0.0.1", pod.handoff_port)
    await raw.reply()
    await raw.cmd("EHLO peer.test")
    token = base64.b64encode(b"\0handoff\0" + SECRET.encode()).decode()
    assert (await raw.cmd("AUTH PLAIN " + token))[0] == 235
    entry = encode_entry(_entry())
    assert (await raw.cmd(f"MAIL FROM:<a@sender.test> XQUEUE={entry}"))[0] == 250
    assert (await raw.cmd("RCPT TO:<someone.else@example.com>"))[0] == 250
    assert (await raw.cmd("DATA"))[0] == 354
    code, text = await raw.cmd("Subject: z\r\n\r\nbody\r\n.")
    assert (code, text.split()[0]) == (554, "5.5.4")
    assert (await raw.cmd("MAIL FROM:<a@sender.test> XQUEUE=not-base64!"))[0] == 501
    assert (await raw.cmd("MAIL FROM:<a@sender.test>"))[0] == 503
    await raw.close()
    assert pod.queued() == 2
    assert SECRET not in pod.run.log


async def test_a_pod_with_several_workers_drains_and_says_so(tmp_path: Path, runs: list[RelayRun]) -> None:
    """With workers the supervisor answers /readyz and /queue (from the spool and the workers'
    metric files) and one worker hands off."""
    retry = {"minBackoff": "1h", "maxBackoff": "2h", "maxLifetime": "5d"}
    peers = Peers(tmp_path, free_port(), ["edge-0", "edge-1"], retry=retry, workers={"edge-1": 2})
    peers.start(runs)
    keep, going = peers["edge-0"], peers["edge-1"]
    await asyncio.to_thread(going.run.wait_for, r"ready \(pid", occurrences=2)
    for i in range(8):
        await send_dsn_message(going.smtp_port, f"w{i}")
    await until(lambda: going.counts()["deferred"] == 8, timeout=60)
    assert (await asyncio.to_thread(going.queue))["drained"] is False
    peers.drain(["edge-1"])
    await until(lambda: http_get(going.metrics_port, "/readyz") == (503, "not ready: draining\n"), timeout=30)
    await until(lambda: going.queue()["drained"] is True, timeout=60)
    report = await asyncio.to_thread(going.queue)
    assert (report["depth"], report["handedOff"], report["pod"]) == (0, 8, "edge-1")
    assert keep.counts()["deferred"] == 8
    for _ in range(6):  # every worker refuses new sessions while draining
        client = await RawClient.connect("127.0.0.1", going.smtp_port)
        code, _text = await client.reply()
        assert code == 421
        await client.close()
