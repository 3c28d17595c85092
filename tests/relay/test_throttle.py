"""Rate limits and adaptive backoff per destination (issue 16): the arithmetic of
relay.core.throttle as tables, the shared table of relay.throttle, and a running relay with two
worker processes whose limited destination receives 50 messages over at least 9 s while another
destination is not slowed; a sink answering 421 triggers backoff and recovery, seen in /metrics."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.config import RouteConfig, RouteLimits, SenderLimits
from relay.core import throttle
from relay.core.model import Disposition, Recipient, RecipientOutcome
from relay.core.throttle import Bucket
from relay.throttle import Limiter, SharedTable
from tests.relay.apphelp import RelayRun, free_port, http_get, relay_to_sink_config, until, write_config
from tests.relay.fronthelp import running_front, tls_config, write_users
from tests.relay.smtpsink import SmtpSink


@pytest.mark.parametrize(
    ("hosts", "destination"),
    [
        (["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"], "google.com"),
        (["mx1.mail.example.co.uk"], "example.co.uk"),
        (["mx.example.de."], "example.de"),
        (["localhost"], "localhost"),
        ([], ""),
    ],
)
def test_rollup(hosts: list[str], destination: str) -> None:
    assert throttle.rollup(hosts) == destination


@pytest.mark.parametrize(
    ("code", "status", "text", "slow_down"),
    [
        (421, "4.7.0", "Try again later", True),
        (421, "", "closing", True),
        (450, "4.7.1", "greylisted", True),
        (451, "4.3.0", "Too many messages from your IP", True),
        (452, "4.2.2", "mailbox full", False),
        (421, "4.4.1", "connection failed: refused", False),  # our own: the host is down
        (421, "4.7.5", "TLS handshake failed", False),
        (550, "5.7.1", "rate limit exceeded", False),  # permanent: bounces, no backoff
    ],
)
def test_is_throttle_reply(code: int, status: str, text: str, slow_down: bool) -> None:
    assert throttle.is_throttle_reply(code, status, text) is slow_down


def test_admit_spaces_messages_and_refuses_long_waits() -> None:
    limits = RouteLimits(messages_per_second=5)
    bucket, waits = Bucket(), []
    for _ in range(4):
        bucket, admission = throttle.admit(bucket, limits, 100.0, max_wait=0.7)
        waits.append(admission.wait)
    assert waits == pytest.approx([0.0, 0.2, 0.4, 0.6])
    refused, admission = throttle.admit(bucket, limits, 100.0, max_wait=0.7)
    assert admission.wait is None and admission.reason == "messagesPerSecond" and refused == bucket
    hourly = RouteLimits(messages_per_hour=60)
    bucket, first = throttle.admit(Bucket(), hourly, 0.0, max_wait=10)
    _, second = throttle.admit(bucket, hourly, 0.0, max_wait=10)
    assert first.wait == 0 and second.wait is None and second.reason == "messagesPerHour"  # 60 s out
    assert throttle.admit(Bucket(), RouteLimits(), 0.0, max_wait=0)[1].wait == 0  # unlimited


def test_throttling_halves_pauses_and_recovers_step_by_step() -> None:
    bucket = throttle.throttled(throttle.throttled(Bucket(), 10.0), 10.0)
    assert bucket.factor == 0.25 and bucket.penalty == 2.0 and bucket.paused_until == 12.0
    limits = RouteLimits(messages_per_second=4)
    _, paused = throttle.admit(bucket, limits, 11.0, max_wait=10)
    assert paused.wait == 1.0 and paused.reason == "backoff"
    slower, _ = throttle.admit(replace_pause(bucket), limits, 20.0, max_wait=10)
    assert throttle.admit(slower, limits, 20.0, max_wait=10)[1].wait == pytest.approx(1.0)  # 4/s * 0.25
    assert throttle.succeeded(bucket, 11.0) == bucket  # still paused
    factors, now = [], 12.0
    while bucket.factor < 1.0:
        bucket = throttle.succeeded(bucket, now)
        bucket = throttle.succeeded(bucket, now + 0.1)  # at most one step per interval
        factors.append(bucket.factor)
        now += throttle.RECOVERY_INTERVAL
    assert factors == [0.375, 0.5, 0.625, 0.75, 0.875, 1.0] and bucket.penalty == 0.0
    assert throttle.connection_cap(20, 0.25) == 5 and throttle.connection_cap(20, 1 / 64) == 2
    assert throttle.per_worker(5, 2) == 2 and throttle.per_worker(1, 4) == 1


def replace_pause(bucket: Bucket) -> Bucket:
    return Bucket(bucket.second_tat, bucket.hour_tat, bucket.factor, 0.0, bucket.penalty, bucket.changed_at)


def test_shared_table_is_one_state_for_every_mapping_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "buckets"
    first, second = SharedTable(path), SharedTable(path)
    try:
        first.transact(["r|d"], lambda b: ([throttle.throttled(b[0], 5.0)], None))
        assert second.get("r|d").factor == 0.5  # another mapping (as another worker has) sees it
        assert second.get("r|other") == Bucket()
        for index in range(5000):  # more keys than slots: the oldest are evicted, no error
            second.transact([f"k{index}"], lambda b, i=index: ([Bucket(changed_at=float(i + 10))], None))
    finally:
        first.close()
        second.close()


def test_peek_reads_what_another_mapping_wrote_and_takes_no_slot(tmp_path: Path) -> None:
    path = tmp_path / "buckets"
    first, second = SharedTable(path), SharedTable(path)
    try:
        assert second.peek("r|d") == Bucket()
        assert path.read_bytes().count(b"\0") == len(path.read_bytes())  # the peek wrote nothing
        first.transact(["r|d"], lambda b: ([throttle.throttled(b[0], 5.0)], None))
        assert second.peek("r|d") == first.get("r|d") and second.peek("r|d").factor == 0.5
        assert second.peek("r|other") == Bucket()
    finally:
        first.close()
        second.close()


async def test_a_route_without_limits_at_a_calm_destination_writes_no_bucket() -> None:
    """The common case costs no locked transaction: nothing to reserve and nothing to recover;
    once the destination asks to slow down, its backoff is kept and honoured as before."""
    table = SharedTable()
    limiter = Limiter(table, workers=1)
    route = RouteConfig(name="r", next_hop={"kind": "mx"})
    delivered = [RecipientOutcome(Recipient("a@d.test"), Disposition.DELIVERED, 250, "2.0.0", "ok")]
    for _ in range(3):
        async with limiter.acquire(route, "d.test", 10) as refusal:
            assert refusal is None
        limiter.record(route, "d.test", delivered)
    assert table._map[:] == bytes(len(table._map))  # no slot taken
    slow = [RecipientOutcome(Recipient("a@d.test"), Disposition.DEFERRED, 421, "4.7.0", "slow down")]
    limiter.record(route, "d.test", slow)
    assert table.peek("r|d.test").factor == 0.5
    limiter.max_wait = 0.0  # the pause now refuses rather than waits
    async with limiter.acquire(route, "d.test", 10) as refusal:
        assert refusal is not None and "backoff" in refusal


async def test_limiter_defers_rather_than_holding_a_slot_for_long() -> None:
    clock = [1000.0]
    limiter = Limiter(SharedTable(), workers=1, clock=lambda: clock[0], max_wait=0.5)
    route = RouteConfig(name="r", next_hop={"kind": "mx"}, limits={"messagesPerSecond": 2})
    results = []
    for _ in range(3):
        async with limiter.acquire(route, "d.test", 10) as refusal:
            results.append(refusal)
    assert results[:2] == [None, None]
    assert results[2] is not None and "messagesPerSecond of route r for d.test" in results[2]


async def test_connection_waiters_are_served_one_per_release_in_arrival_order() -> None:
    """Deliveries queue for a destination's connections first come, first served; each release
    hands its connection to exactly one waiter, and the count of waiters (which the intake gate
    reads) follows."""
    limiter = Limiter(SharedTable(), workers=1)
    changes: list[int] = []
    limiter.on_waiters = lambda: changes.append(limiter.connection_waiters)
    route = RouteConfig(name="r", next_hop={"kind": "mx"})
    order: list[int] = []
    release = [asyncio.Event() for _ in range(4)]

    async def delivery(n: int) -> None:
        async with limiter.acquire(route, "d.test", 2) as refusal:
            assert refusal is None
            order.append(n)
            await release[n].wait()

    tasks = [asyncio.create_task(delivery(n)) for n in range(4)]
    await until(lambda: limiter.connection_waiters == 2)
    assert order == [0, 1]  # two connections; 2 and 3 wait
    release[1].set()
    await until(lambda: order == [0, 1, 2])
    await asyncio.sleep(0.01)
    assert order == [0, 1, 2] and limiter.connection_waiters == 1  # one release, one served
    release[0].set()
    release[2].set()
    release[3].set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert changes == [1, 2, 1, 0]
    assert limiter._inflight == {} and limiter._queues == {}


async def test_a_connection_wait_ends_in_a_refusal_or_a_cancellation_without_leaking_a_slot() -> None:
    limiter = Limiter(SharedTable(), workers=1, max_wait=0.05)
    route = RouteConfig(name="r", next_hop={"kind": "mx"})
    hold = asyncio.Event()

    async def holder() -> None:
        async with limiter.acquire(route, "d.test", 1) as refusal:
            assert refusal is None
            await hold.wait()

    then: list[asyncio.Task[None]] = []

    async def first_holder() -> None:
        await holder()
        for task in then:  # in the same step as the release that handed `task` the connection
            task.cancel()

    first = asyncio.create_task(first_holder())
    await asyncio.sleep(0)
    async with limiter.acquire(route, "d.test", 1) as refusal:  # waits 0.05 s, then refused
        assert refusal is not None and "connections of route r for d.test in use" in refusal
    limiter.max_wait = 30.0
    waiter = asyncio.create_task(holder())
    await until(lambda: limiter.connection_waiters == 1)
    waiter.cancel()  # cancelled while waiting: nothing held
    with pytest.raises(asyncio.CancelledError):
        await waiter
    granted = asyncio.create_task(holder())
    then.append(granted)
    await until(lambda: limiter.connection_waiters == 1)
    hold.set()
    await first  # its release hands the connection to `granted`, cancelled in the same moment
    with pytest.raises(asyncio.CancelledError):
        await granted
    assert limiter.connection_waiters == 0
    assert limiter._inflight == {}, "the handed-over connection went back"


# --------------------------------------------------------------------------- a running relay

MESSAGE = "From: a@sender.org\r\nTo: {rcpt}\r\nSubject: n{n}\r\n\r\nhello\r\n"


async def send_many(port: int, rcpts: list[str], sessions: int = 4) -> None:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for n, rcpt in enumerate(rcpts):
        queue.put_nowait((n, rcpt))

    async def session() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await smtp.connect()
        while not queue.empty():
            n, rcpt = queue.get_nowait()
            await smtp.sendmail("a@sender.org", [rcpt], MESSAGE.format(rcpt=rcpt, n=n))
        await smtp.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))


def route(name: str, domain: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"recipientDomains": [domain]},
        "nextHop": {"kind": "relay", "name": name, "host": "127.0.0.1", "port": port},
        **extra,
    }


async def test_a_limited_destination_is_spread_and_another_is_not_slowed(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    limited, other = await SmtpSink().start(), await SmtpSink().start()
    smtp_port = free_port()
    config = relay_to_sink_config(
        tmp_path,
        hostname="limits.relay.test",
        domains=["slow.test", "fast.test"],
        smtp_port=smtp_port,
        metrics_port=free_port(),
        sink_port=limited.port,
        workers=2,  # the budget must hold for the relay, not per worker process
        routes=[
            route("slow", "slow.test", limited.port, limits={"messagesPerSecond": 5}),
            route("fast", "fast.test", other.port),
        ],
    )
    run = RelayRun(write_config(tmp_path, config)).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid", occurrences=2)
        rcpts = [f"u{n}@{'slow' if n % 2 else 'fast'}.test" for n in range(100)]
        await send_many(smtp_port, rcpts)
        await until(lambda: len(limited.messages) == 50 and len(other.messages) == 50, timeout=90)
        slow = sorted(m.arrived_at for m in limited.messages)
        fast = sorted(m.arrived_at for m in other.messages)
        # 50 messages at 5/s with a burst of one: the last no earlier than 49 * 0.2 s after the first
        assert slow[-1] - slow[0] >= 9.0, slow[-1] - slow[0]
        # the other destination got all of its mail while the limited one had half of its own
        assert fast[-1] < slow[24], (fast[-1] - slow[0], slow[24] - slow[0])
    finally:
        await limited.stop()
        await other.stop()


def sample(body: str, name: str, **labels: str) -> float | None:
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_destination_answering_421_is_backed_off_and_recovers(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    sink = await SmtpSink(data_replies=["421 4.7.0 Too many messages, slow down"] * 3).start()
    smtp_port, metrics_port = free_port(), free_port()
    config = relay_to_sink_config(
        tmp_path,
        hostname="backoff.relay.test",
        domains=["example.com"],
        smtp_port=smtp_port,
        metrics_port=metrics_port,
        sink_port=sink.port,
        workers=1,
    )
    config["queue"]["retry"] = {"minBackoff": "1s", "maxBackoff": "1s", "maxLifetime": "1h"}
    run = RelayRun(write_config(tmp_path, config)).start()
    runs.append(run)
    labels = {"route": "to-sink", "destination": "127.0.0.1"}

    async def metrics() -> str:
        return (await asyncio.to_thread(http_get, metrics_port, "/metrics"))[1]

    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid")
        await send_many(smtp_port, ["first@example.com"], sessions=1)
        await asyncio.to_thread(run.wait_for, "asked to slow down", occurrences=3, timeout=60)
        await until(lambda: len(sink.messages) == 1, timeout=60)  # delivered after the backoff
        body = await metrics()
        assert (sample(body, "mailrelay_destination_throttled_total", **labels, reason="remote") or 0) >= 3
        assert (sample(body, "mailrelay_destination_deferred_total", **labels, reason="throttled") or 0) >= 3
        factors = [sample(body, "mailrelay_destination_rate_factor", **labels)]
        assert factors[0] is not None and factors[0] <= 0.25  # 1/8 after three, +1 step at most
        # recovery is gradual: every further delivery may raise the factor one step per second
        sent = 1
        while factors[-1] != 1.0:
            assert sent < 40, factors
            await send_many(smtp_port, [f"next{sent}@example.com"], sessions=1)
            sent += 1
            await until(lambda n=sent: len(sink.messages) == n, timeout=60)
            factors.append(sample(await metrics(), "mailrelay_destination_rate_factor", **labels))
            await asyncio.sleep(0.3)
        assert factors == sorted(factors)  # never down again while the sink accepts
        assert len({f for f in factors if f is not None and 0.25 < f < 1.0}) >= 3  # several steps
        assert re.search(r"asked to slow down \(421 4\.7\.0\)", run.log)
    finally:
        await sink.stop()


# --------------------------------------------------------------------------- per-sender caps


@pytest.mark.parametrize(
    ("login", "mail_from", "key"),
    [
        ("alice", "x@y.test", "user:alice"),
        (None, "a@Corp.Example", "domain:corp.example"),
        (None, "", "domain:<>"),
    ],
)
def test_sender_key(login: str | None, mail_from: str, key: str) -> None:
    assert throttle.sender_key(login, mail_from) == key


def test_sender_cap_allows_a_burst_of_its_count_then_one_per_share() -> None:
    bucket, allowed = Bucket(), []
    for _ in range(4):
        bucket, ok = throttle.sender_cap(bucket, 3, None, 0.0)
        allowed.append(ok)
    assert allowed == [True, True, True, False]
    assert throttle.sender_cap(bucket, 3, None, 19.0)[1] is False
    assert throttle.sender_cap(bucket, 3, None, 20.0)[1] is True  # one share (60 s / 3) later
    assert throttle.sender_cap(Bucket(), None, 1, 0.0)[1] is True
    assert throttle.sender_cap(throttle.sender_cap(Bucket(), None, 1, 0.0)[0], None, 1, 3599.0)[1] is False


async def test_submission_sender_cap_answers_450_per_user(tmp_path: Path) -> None:
    config, context = tls_config(tmp_path)
    users = write_users(tmp_path, {"alice": "wonderland", "bob": "builder"})
    listeners = [
        lc.model_copy(update={"sender_limits": SenderLimits(messages_per_minute=2)})
        if lc.name == "submission"
        else lc
        for lc in config.listeners
    ]
    assert config.auth is not None
    config = config.model_copy(
        update={"listeners": listeners, "auth": config.auth.model_copy(update={"users_file": users})}
    )

    async def send(front: Any, user: str, password: str, count: int) -> list[int]:
        host, port = front.addresses["submission"]
        smtp = aiosmtplib.SMTP(hostname=host, port=port, tls_context=context, start_tls=True)
        await smtp.connect()
        await smtp.login(user, password)
        codes = []
        for _ in range(count):
            try:
                await smtp.sendmail(
                    f"{user}@sender.org", ["friend@elsewhere.org"], b"Subject: x\r\n\r\nx\r\n"
                )
                codes.append(250)
            except aiosmtplib.SMTPSenderRefused as exc:
                assert exc.message.startswith("4.7.0 Too many messages from this sender")
                codes.append(exc.code)
        await smtp.quit()
        return codes

    async with running_front(config) as front:
        assert await send(front, "alice", "wonderland", 3) == [250, 250, 450]
        assert await send(front, "bob", "builder", 2) == [250, 250]  # another user has a budget of his own
        assert await send(front, "alice", "wonderland", 1) == [450]  # a new session does not reset it
