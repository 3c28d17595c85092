"""relay.scheduler end to end: a real spool directory, real aiosmtpd sinks on loopback, a real DNS
server for MX, and an injected clock for backoff and lifetime (no sleeping for retries)."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from relay.config import RelayConfig, parse_config
from relay.core.model import Envelope, QueueEntry, Recipient
from relay.delivery import SmtpClient
from relay.scan import DEFERRED_SCAN_INTERVAL
from relay.scheduler import Scheduler
from relay.spool import Spool, new_queue_id
from tests.relay.apphelp import free_port, until
from tests.relay.dnsserver import DnsServer
from tests.relay.smtpsink import SmtpSink

T0 = 1_700_000_000.0
CONTENT = b"From: s@sender.test\r\nTo: a@dest.test\r\nSubject: hello\r\n\r\nhello world\r\n"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def relay_hop(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    return {"kind": "relay", "name": f"r{port}", "host": host, "port": port}


def make_config(
    tmp_path: Path,
    routes: Sequence[dict[str, Any]],
    *,
    nameserver: str | None = None,
    retry: dict[str, str] | None = None,
    **queue: Any,
) -> RelayConfig:
    data: dict[str, Any] = {
        "hostname": "relay.test",
        "listeners": [{"name": "smtp", "port": 2525}],
        "queue": {
            "directory": str(tmp_path / "q"),
            "connectTimeout": "2s",
            "commandTimeout": "5s",
            "dataTimeout": "5s",
            "retry": retry or {"minBackoff": "5m", "maxBackoff": "1h", "maxLifetime": "5d"},
            **queue,
        },
        "routes": list(routes),
    }
    if nameserver:
        data["dns"] = {"nameservers": [nameserver], "timeout": "1s"}
    return parse_config(data)


def bounce_route(port: int) -> dict[str, Any]:
    """DSNs go back to the sender's domain sender.test."""
    return {
        "name": "bounces",
        "priority": 50,
        "match": {"recipientDomains": ["sender.test"]},
        "nextHop": relay_hop(port),
    }


async def store(
    spool: Spool,
    recipients: Sequence[str | Recipient],
    *,
    mail_from: str = "s@sender.test",
    content: bytes = CONTENT,
    arrival: float = T0,
    **envelope: Any,
) -> str:
    rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
    entry = QueueEntry(
        queue_id=new_queue_id(),
        envelope=Envelope(mail_from=mail_from, recipients=rcpts, **envelope),
        arrival=arrival,
        pending=rcpts,
        client_address="127.0.0.9",
        helo="client.test",
    )
    await spool.store(entry, content)
    return entry.queue_id


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.spool = Spool(tmp_path / "q", fsync=False)
        self.spool.prepare()
        self.clock = Clock()
        self.schedulers: list[Scheduler] = []
        self.sinks: list[SmtpSink] = []

    async def sink(self, **kwargs: Any) -> SmtpSink:
        sink = await SmtpSink(**kwargs).start()
        self.sinks.append(sink)
        return sink

    async def sink_and_bounces(self, **sink_kwargs: Any) -> tuple[SmtpSink, SmtpSink, RelayConfig]:
        """A config whose route ``all`` sends every recipient to a sink (made with
        `sink_kwargs`) and whose DSNs go to a second sink: (sink, bounce sink, config)."""
        bounce_sink = await self.sink()
        sink = await self.sink(**sink_kwargs)
        routes = [{"name": "all", "nextHop": relay_hop(sink.port)}, bounce_route(bounce_sink.port)]
        return sink, bounce_sink, make_config(self.tmp_path, routes)

    async def scheduler(self, config: RelayConfig, **kwargs: Any) -> Scheduler:
        scheduler = Scheduler(config, self.spool, clock=self.clock, scan_interval=30.0, **kwargs)
        await scheduler.start()
        self.schedulers.append(scheduler)
        return scheduler

    async def close(self) -> None:
        for scheduler in self.schedulers:
            await scheduler.stop(5)
        for sink in self.sinks:
            await sink.stop()
        self.spool.close()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    await harness.close()


async def run(scheduler: Scheduler, *queue_ids: str) -> None:
    for queue_id in queue_ids:
        scheduler.notify(queue_id)
    await asyncio.wait_for(scheduler.wait_idle(), 30)


def parse(content: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def dsn_fields(content: bytes) -> tuple[dict[str, str], list[dict[str, str]], email.message.EmailMessage]:
    """(per-message fields, per-recipient fields, whole report) of an RFC 3464 DSN."""
    report = parse(content)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    fields = [dict(block.items()) for block in blocks]
    return fields[0], fields[1:], report


# --------------------------------------------------------------------------- routes and hops


async def test_one_transaction_per_hop_with_many_rcpts(h: Harness) -> None:
    sink = await h.sink()
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    scheduler = await h.scheduler(config)
    queue_id = await store(h.spool, ["a@dest.test", "b@dest.test", "c@other.test"])
    await run(scheduler, queue_id)
    assert len(sink.messages) == 1
    assert sink.messages[0].rcpt_tos == ["a@dest.test", "b@dest.test", "c@other.test"]
    assert sink.messages[0].content == CONTENT
    assert scheduler.stats["delivered"] == 3
    assert h.spool.depth()["active"] == 0 and h.spool.depth()["deferred"] == 0


async def test_recipients_split_by_route(h: Harness) -> None:
    corp, rest = await h.sink(), await h.sink()
    config = make_config(
        h.tmp_path,
        [
            {
                "name": "corp",
                "priority": 10,
                "match": {"recipientDomains": ["*.corp.test"]},
                "nextHop": relay_hop(corp.port),
            },
            {"name": "default", "nextHop": relay_hop(rest.port)},
        ],
    )
    scheduler = await h.scheduler(config)
    await run(scheduler, await store(h.spool, ["x@a.corp.test", "y@else.test", "z@b.corp.test"]))
    assert corp.recipients == ["x@a.corp.test", "z@b.corp.test"]
    assert rest.recipients == ["y@else.test"]


async def test_connections_are_reused_across_messages(h: Harness) -> None:
    sink = await h.sink()
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    scheduler = await h.scheduler(config)
    for _ in range(4):
        await run(scheduler, await store(h.spool, ["a@dest.test"]))
    assert len(sink.messages) == 4
    assert sink.connections == 1


async def test_an_injected_smtp_client_carries_the_mail_and_is_left_to_its_owner(h: Harness) -> None:
    sink = await h.sink()
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    client = SmtpClient(config.hostname, config.queue)
    scheduler = await h.scheduler(config, client=client)
    await run(scheduler, await store(h.spool, ["a@dest.test"]))
    assert sink.recipients == ["a@dest.test"]
    assert client.connections_opened == 1
    await scheduler.stop(5)
    assert client.idle_connections() == 1  # not the scheduler's to close
    await client.close()
    assert client.idle_connections() == 0


async def test_concurrency_per_destination_is_limited(h: Harness) -> None:
    sink = await h.sink(data_delay=0.05)
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}], maxPerDestination=2)
    scheduler = await h.scheduler(config)
    ids = [await store(h.spool, [f"a{i}@dest.test"]) for i in range(8)]
    await run(scheduler, *ids)
    assert len(sink.messages) == 8
    assert 1 <= sink.connections <= 2


async def test_failover_when_first_hop_is_unreachable(h: Harness) -> None:
    sink = await h.sink()
    route = {"name": "all", "nextHop": relay_hop(free_port()), "failover": [relay_hop(sink.port)]}
    scheduler = await h.scheduler(make_config(h.tmp_path, [route]))
    await run(scheduler, await store(h.spool, ["a@dest.test"]))
    assert sink.recipients == ["a@dest.test"]
    assert scheduler.stats == {"delivered": 1, "deferred": 0, "bounced": 0, "dsn": 0}


async def test_failover_when_first_hop_answers_4xx_for_one_recipient(h: Harness) -> None:
    first = await h.sink(rcpt_replies={"b@dest.test": "451 4.3.0 busy"})
    second = await h.sink()
    route = {"name": "all", "nextHop": relay_hop(first.port), "failover": [relay_hop(second.port)]}
    scheduler = await h.scheduler(make_config(h.tmp_path, [route]))
    await run(scheduler, await store(h.spool, ["a@dest.test", "b@dest.test"]))
    assert first.recipients == ["a@dest.test"]
    assert second.recipients == ["b@dest.test"]


async def test_no_failover_after_5xx(h: Harness) -> None:
    bounce_sink = await h.sink()
    first = await h.sink(rcpt_replies={"a@dest.test": "550 5.1.1 unknown"})
    second = await h.sink()
    route = {"name": "all", "nextHop": relay_hop(first.port), "failover": [relay_hop(second.port)]}
    scheduler = await h.scheduler(make_config(h.tmp_path, [route, bounce_route(bounce_sink.port)]))
    await run(scheduler, await store(h.spool, ["a@dest.test"]))
    assert second.messages == []
    assert scheduler.stats["bounced"] == 1


async def test_reject_hop_at_delivery_bounces_with_its_reply(h: Harness) -> None:
    bounce_sink = await h.sink()
    route = {"name": "no", "nextHop": {"kind": "reject", "code": 550, "message": "5.7.1 not here"}}
    config = make_config(h.tmp_path, [route, bounce_route(bounce_sink.port)])
    scheduler = await h.scheduler(config)
    await run(scheduler, await store(h.spool, ["a@dest.test"]))
    _, recipients, _ = dsn_fields(bounce_sink.messages[0].content)
    assert recipients[0]["Status"] == "5.7.1"
    assert recipients[0]["Action"] == "failed"


async def test_unrouted_recipient_is_deferred_not_lost(h: Harness) -> None:
    config = make_config(
        h.tmp_path, [{"name": "only", "match": {"recipientDomains": ["x.test"]}, "nextHop": relay_hop(1)}]
    )
    scheduler = await h.scheduler(config)
    queue_id = await store(h.spool, ["a@dest.test"])
    await run(scheduler, queue_id)
    state, message = h.spool.read(queue_id) or ("", None)
    assert state == "deferred" and message is not None
    assert message.entry.results[0].status == "4.4.4"


async def test_route_reload_applies_to_queued_mail(h: Harness) -> None:
    old, new = await h.sink(rcpt_replies={"a@dest.test": "451 4.3.0 later"}), await h.sink()
    scheduler = await h.scheduler(make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(old.port)}]))
    queue_id = await store(h.spool, ["a@dest.test"])
    await run(scheduler, queue_id)
    assert h.spool.read(queue_id) is not None
    scheduler.update_config(make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(new.port)}]))
    h.clock.now += 3600
    await scheduler.rescan()
    await asyncio.wait_for(scheduler.wait_idle(), 30)
    assert new.recipients == ["a@dest.test"]
    assert h.spool.read(queue_id) is None


async def test_start_picks_up_incoming_and_due_deferred_mail(h: Harness) -> None:
    sink = await h.sink()
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    await store(h.spool, ["fresh@dest.test"])
    due = await store(h.spool, ["due@dest.test"])
    later = await store(h.spool, ["later@dest.test"])
    for queue_id, when in ((due, T0 - 10), (later, T0 + 3600)):
        message = await h.spool.claim(queue_id)
        assert message is not None
        await h.spool.defer(message.entry.with_changes(next_attempt=when, attempts=1), message.content)
    scheduler = await h.scheduler(config)  # no notify: start() must find them
    await asyncio.wait_for(scheduler.wait_idle(), 30)
    assert sorted(sink.recipients) == ["due@dest.test", "fresh@dest.test"]
    assert h.spool.ids("deferred") == [later]


async def test_a_message_another_worker_deferred_again_is_not_attempted_early(h: Harness) -> None:
    """Two workers share the spool. This scheduler's scan remembered a deferred message's next
    attempt; meanwhile another worker attempted it and deferred it further. At the remembered
    time it must stay deferred (not attempted early), and go out at the new time."""
    sink = await h.sink()
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    queue_id = await store(h.spool, ["a@dest.test"])
    message = await h.spool.claim(queue_id)
    assert message is not None
    await h.spool.defer(message.entry.with_changes(next_attempt=T0 + 100, attempts=1), message.content)
    scheduler = await h.scheduler(config)  # its start scan sees T0 + 100
    other = await h.spool.claim(queue_id)  # "the other worker" (early, by hand)
    assert other is not None
    await h.spool.defer(other.entry.with_changes(next_attempt=T0 + 500, attempts=2), other.content)
    h.clock.now = T0 + 100
    await scheduler.rescan()
    await asyncio.wait_for(scheduler.wait_idle(), 30)
    assert sink.messages == []
    assert dict(h.spool.scan_deferred())[queue_id] == T0 + 500
    h.clock.now = T0 + 500
    await scheduler.rescan()
    await asyncio.wait_for(scheduler.wait_idle(), 30)
    assert sink.recipients == ["a@dest.test"]


async def test_stop_leaves_waiting_mail_on_disk(h: Harness) -> None:
    sink = await h.sink(rcpt_replies={"a@dest.test": "451 4.3.0 later"})
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    scheduler = await h.scheduler(config)
    queue_id = await store(h.spool, ["a@dest.test"])
    await run(scheduler, queue_id)
    await scheduler.stop(5)
    assert h.spool.ids("deferred") == [queue_id]
    scheduler.notify(await store(h.spool, ["b@dest.test"]))  # ignored after stop
    assert len(h.spool.ids("incoming")) == 1


# --------------------------------------------------------------------------- retry, expiry, DSN


async def test_4xx_then_success_after_backoff(h: Harness) -> None:
    sink = await h.sink(data_replies=["451 4.3.0 try again later"])
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    scheduler = await h.scheduler(config)
    queue_id = await store(h.spool, ["a@dest.test"])
    await run(scheduler, queue_id)
    found = h.spool.read(queue_id)
    assert found is not None
    state, message = found
    assert state == "deferred"
    assert message.entry.attempts == 1
    assert message.entry.next_attempt == T0 + 300  # minBackoff
    assert message.entry.results[0].status == "4.3.0"
    assert dict(h.spool.scan_deferred())[queue_id] == T0 + 300

    h.clock.now = T0 + 299  # not due yet
    await scheduler.rescan()
    await asyncio.wait_for(scheduler.wait_idle(), 30)
    assert sink.messages == []

    h.clock.now = T0 + 300
    await scheduler.rescan()
    await asyncio.wait_for(scheduler.wait_idle(), 30)
    assert sink.recipients == ["a@dest.test"]
    assert h.spool.read(queue_id) is None
    assert scheduler.stats["deferred"] == 1 and scheduler.stats["delivered"] == 1


async def test_a_deep_deferred_queue_is_listed_only_when_something_may_be_due(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """incoming/ is listed at every scan; deferred/ (O(queue) to list) only at the earliest due
    time seen, after this process's own deferrals come due, and every DEFERRED_SCAN_INTERVAL."""
    sink = await h.sink()
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    for _ in range(20):  # deferred by another worker until T0 + 3600
        queue_id = await store(h.spool, ["a@dest.test"])
        message = await h.spool.claim(queue_id)
        assert message is not None
        await h.spool.defer(message.entry.with_changes(attempts=1, next_attempt=T0 + 3600), message.content)
    listings = {"incoming": 0, "deferred": 0}
    scans = asyncio.Event()
    loop = asyncio.get_running_loop()
    real_ids, real_scan_deferred = h.spool.ids, h.spool.scan_deferred

    def ids(state: str) -> list[str]:
        listings[state] += 1
        loop.call_soon_threadsafe(scans.set)
        return real_ids(state)

    def scan_deferred(known: Any = None) -> Any:
        listings["deferred"] += 1
        return real_scan_deferred(known)

    monkeypatch.setattr(h.spool, "ids", ids)
    monkeypatch.setattr(h.spool, "scan_deferred", scan_deferred)

    async def scan_loop_runs(times: int) -> None:
        seen = listings["incoming"]
        while listings["incoming"] < seen + times:
            scans.clear()
            await asyncio.wait_for(scans.wait(), 30)

    scheduler = Scheduler(config, h.spool, clock=h.clock, scan_interval=0.01)
    h.schedulers.append(scheduler)
    await scheduler.start()
    await scan_loop_runs(5)
    assert listings["deferred"] == 1  # the listing at start, then incoming/ only
    h.clock.now = T0 + DEFERRED_SCAN_INTERVAL  # other workers may have deferred mail since
    await scan_loop_runs(5)
    assert listings["deferred"] == 2 and sink.messages == []
    h.clock.now = T0 + 3600  # the earliest due time seen
    await until(lambda: len(sink.messages) == 20)
    assert listings["deferred"] >= 3


async def test_backoff_grows_exponentially(h: Harness) -> None:
    sink = await h.sink(rcpt_replies={"a@dest.test": "451 4.3.0 later"})
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    scheduler = await h.scheduler(config)
    queue_id = await store(h.spool, ["a@dest.test"])
    scheduler.notify(queue_id)
    waits = []
    for _ in range(5):
        await asyncio.wait_for(scheduler.wait_idle(), 30)
        found = h.spool.read(queue_id)
        assert found is not None
        waits.append(found[1].entry.next_attempt - h.clock.now)
        h.clock.now = found[1].entry.next_attempt
        await scheduler.rescan()
    assert waits == [300, 600, 1200, 2400, 3600]


async def test_lifetime_expiry_bounces_with_4_4_7_and_dsn(h: Harness) -> None:
    _sink, bounce_sink, config = await h.sink_and_bounces(
        rcpt_replies={"a@dest.test": "451 4.2.0 mailbox busy"}
    )
    scheduler = await h.scheduler(config)
    queue_id = await store(h.spool, ["a@dest.test"], arrival=T0 - 5 * 86400 - 1)
    await run(scheduler, queue_id)
    assert h.spool.read(queue_id) is None
    assert scheduler.stats["bounced"] == 1
    assert len(bounce_sink.messages) == 1
    dsn = bounce_sink.messages[0]
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["s@sender.test"]
    per_message, recipients, _ = dsn_fields(dsn.content)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert recipients[0]["Status"] == "4.4.7"
    assert recipients[0]["Action"] == "failed"
    assert "mailbox busy" in recipients[0]["Diagnostic-Code"]


async def test_next_attempt_is_not_later_than_expiry(h: Harness) -> None:
    sink = await h.sink(rcpt_replies={"a@dest.test": "451 4.3.0 later"})
    config = make_config(h.tmp_path, [{"name": "all", "nextHop": relay_hop(sink.port)}])
    scheduler = await h.scheduler(config)
    queue_id = await store(h.spool, ["a@dest.test"], arrival=T0 - 5 * 86400 + 100)
    await run(scheduler, queue_id)
    found = h.spool.read(queue_id)
    assert found is not None
    assert found[1].entry.next_attempt == T0 + 100


async def test_bounce_produces_rfc3464_dsn(h: Harness) -> None:
    sink, bounce_sink, config = await h.sink_and_bounces(
        rcpt_replies={"bad@dest.test": "550 5.1.1 no such user"}
    )
    scheduler = await h.scheduler(config)
    queue_id = await store(
        h.spool,
        [Recipient("good@dest.test"), Recipient("bad@dest.test", orcpt="rfc822;Bad@dest.test")],
        envid="ENV-1",
        ret="HDRS",
    )
    await run(scheduler, queue_id)
    assert sink.recipients == ["good@dest.test"]
    assert len(bounce_sink.messages) == 1
    dsn = bounce_sink.messages[0]
    assert dsn.mail_from == ""
    assert dsn.rcpt_tos == ["s@sender.test"]
    per_message, recipients, report = dsn_fields(dsn.content)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Original-Envelope-Id"] == "ENV-1"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert per_message["Received-From-MTA"].startswith("dns; client.test")
    assert len(recipients) == 1
    fields = recipients[0]
    assert fields["Final-Recipient"] == "rfc822;bad@dest.test"
    assert fields["Original-Recipient"] == "rfc822;Bad@dest.test"
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.1.1"
    assert fields["Remote-MTA"] == "dns; 127.0.0.1"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert "Subject: hello" in returned.get_content()
    assert "hello world" not in returned.get_content()
    assert report["To"].addresses[0].addr_spec == "s@sender.test"
    assert report["Auto-Submitted"] == "auto-replied"


async def test_no_dsn_for_null_sender(h: Harness) -> None:
    _sink, bounce_sink, config = await h.sink_and_bounces(
        rcpt_replies={"a@dest.test": "550 5.1.1 no such user"}
    )
    scheduler = await h.scheduler(config)
    await run(scheduler, await store(h.spool, ["a@dest.test"], mail_from=""))
    assert scheduler.stats["bounced"] == 1
    assert scheduler.stats["dsn"] == 0
    assert bounce_sink.messages == []
    assert sum(h.spool.depth().values()) == 0


async def test_notify_never_suppresses_the_dsn(h: Harness) -> None:
    _sink, bounce_sink, config = await h.sink_and_bounces(
        rcpt_replies={"a@dest.test": "550 5.1.1 no such user"}
    )
    scheduler = await h.scheduler(config)
    await run(scheduler, await store(h.spool, [Recipient("a@dest.test", notify=("NEVER",))]))
    assert scheduler.stats["bounced"] == 1 and scheduler.stats["dsn"] == 0
    assert bounce_sink.messages == []


async def test_relayed_dsn_for_success_notify_at_hop_without_dsn(h: Harness) -> None:
    sink, bounce_sink, config = await h.sink_and_bounces(dsn=False)
    scheduler = await h.scheduler(config)
    await run(scheduler, await store(h.spool, [Recipient("a@dest.test", notify=("SUCCESS", "FAILURE"))]))
    assert sink.recipients == ["a@dest.test"]
    _, recipients, report = dsn_fields(bounce_sink.messages[0].content)
    assert recipients[0]["Action"] == "relayed"
    assert report["Subject"] == "Successful Mail Delivery Report"


async def test_no_success_dsn_when_next_hop_supports_dsn(h: Harness) -> None:
    sink, bounce_sink, config = await h.sink_and_bounces(dsn=True)
    scheduler = await h.scheduler(config)
    await run(scheduler, await store(h.spool, [Recipient("a@dest.test", notify=("SUCCESS",))]))
    assert sink.messages[0].dsn_rcpt == {"a@dest.test": {"NOTIFY": "SUCCESS"}}
    assert bounce_sink.messages == []


async def test_delay_warning_once_for_notify_delay(h: Harness) -> None:
    _sink, bounce_sink, config = await h.sink_and_bounces(rcpt_replies={"a@dest.test": "451 4.3.0 later"})
    scheduler = await h.scheduler(config, delay_warning_after=3600)
    queue_id = await store(
        h.spool, [Recipient("a@dest.test", notify=("DELAY", "FAILURE"))], arrival=T0 - 7200
    )
    await run(scheduler, queue_id)
    assert len(bounce_sink.messages) == 1
    _, recipients, _ = dsn_fields(bounce_sink.messages[0].content)
    assert recipients[0]["Action"] == "delayed"
    assert recipients[0]["Status"] == "4.3.0"
    assert "Will-Retry-Until" in recipients[0]
    h.clock.now += 3600
    await scheduler.rescan()
    await asyncio.wait_for(scheduler.wait_idle(), 30)
    assert len(bounce_sink.messages) == 1  # warned once only
    assert h.spool.read(queue_id) is not None


async def test_gateway_hop_delivers_to_maildir(h: Harness, tmp_path: Path) -> None:
    route = {
        "name": "box",
        "nextHop": {"kind": "gateway", "maildir": {"path": str(tmp_path / "mail"), "layout": "single"}},
    }
    scheduler = await h.scheduler(make_config(h.tmp_path, [route]))
    await run(scheduler, await store(h.spool, ["a@dest.test"]))
    files = list((tmp_path / "mail" / "new").iterdir())
    assert len(files) == 1
    assert b"hello world" in files[0].read_bytes()
    assert scheduler.stats["delivered"] == 1


# --------------------------------------------------------------------------- MX


@pytest.fixture
def mx_zone(dns_server: DnsServer) -> DnsServer:
    return dns_server


async def test_mx_delivery_next_host_after_connection_refused(h: Harness, dns_server: DnsServer) -> None:
    good = await h.sink(host="127.0.0.3")  # nothing listens on 127.0.0.2:<same port>
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.", "20 mx2.dest.test.")
    dns_server.add("mx1.dest.test", "A", "127.0.0.2")
    dns_server.add("mx2.dest.test", "A", "127.0.0.3")
    route = {"name": "mx", "nextHop": {"kind": "mx", "port": good.port, "tls": "none"}}
    scheduler = await h.scheduler(make_config(h.tmp_path, [route], nameserver=dns_server.nameserver))
    await run(scheduler, await store(h.spool, ["a@dest.test", "b@dest.test"]))
    assert good.recipients == ["a@dest.test", "b@dest.test"]
    assert dns_server.count("dest.test", "MX") == 1


async def test_mx_next_host_after_4xx_and_preference_order(h: Harness, dns_server: DnsServer) -> None:
    port = free_port("127.0.0.4")
    busy = await h.sink(host="127.0.0.4", port=port, data_replies=["421 4.3.2 shutting down"])
    good = await h.sink(host="127.0.0.5", port=port)
    unused = await h.sink(host="127.0.0.6", port=port)
    dns_server.add("dest.test", "MX", "30 mx3.dest.test.", "5 mx1.dest.test.", "10 mx2.dest.test.")
    for n, ip in ((1, "127.0.0.4"), (2, "127.0.0.5"), (3, "127.0.0.6")):
        dns_server.add(f"mx{n}.dest.test", "A", ip)
    route = {"name": "mx", "nextHop": {"kind": "mx", "port": port}}
    scheduler = await h.scheduler(make_config(h.tmp_path, [route], nameserver=dns_server.nameserver))
    await run(scheduler, await store(h.spool, ["a@dest.test"]))
    assert busy.messages == [] and busy.connections == 1
    assert good.recipients == ["a@dest.test"]
    assert unused.connections == 0


async def test_implicit_mx_uses_the_domain_address(h: Harness, dns_server: DnsServer) -> None:
    sink = await h.sink(host="127.0.0.7")
    dns_server.add("dest.test", "A", "127.0.0.7")  # no MX record
    route = {"name": "mx", "nextHop": {"kind": "mx", "port": sink.port}}
    scheduler = await h.scheduler(make_config(h.tmp_path, [route], nameserver=dns_server.nameserver))
    await run(scheduler, await store(h.spool, ["a@dest.test"]))
    assert sink.recipients == ["a@dest.test"]


@pytest.mark.parametrize(
    ("setup", "status"),
    [
        ("null", "5.1.10"),
        ("nxdomain", "5.1.2"),
        ("no_address", "5.1.2"),
    ],
)
async def test_mx_permanent_failures_bounce(
    h: Harness, dns_server: DnsServer, setup: str, status: str
) -> None:
    bounce_sink = await h.sink()
    if setup == "null":
        dns_server.add("dest.test", "MX", "0 .")
    elif setup == "no_address":
        dns_server.add("dest.test", "TXT", '"v=spf1 -all"')
    route = {"name": "mx", "nextHop": {"kind": "mx", "port": free_port()}}
    config = make_config(
        h.tmp_path, [route, bounce_route(bounce_sink.port)], nameserver=dns_server.nameserver
    )
    scheduler = await h.scheduler(config)
    await run(scheduler, await store(h.spool, ["a@dest.test"]))
    assert scheduler.stats["bounced"] == 1
    _, recipients, _ = dsn_fields(bounce_sink.messages[0].content)
    assert recipients[0]["Status"] == status


@pytest.mark.parametrize("failure", ["servfail", "timeout"])
async def test_mx_lookup_failure_defers(h: Harness, dns_server: DnsServer, failure: str) -> None:
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.")
    if failure == "servfail":
        dns_server.servfail("dest.test")
    else:
        dns_server.drop("dest.test")
    route = {"name": "mx", "nextHop": {"kind": "mx", "port": free_port()}}
    scheduler = await h.scheduler(make_config(h.tmp_path, [route], nameserver=dns_server.nameserver))
    queue_id = await store(h.spool, ["a@dest.test"])
    await run(scheduler, queue_id)
    found = h.spool.read(queue_id)
    assert found is not None and found[0] == "deferred"
    assert found[1].entry.results[0].status == "4.4.3"
    assert scheduler.stats["bounced"] == 0


async def test_mx_all_hosts_down_defers_4_4_1(h: Harness, dns_server: DnsServer) -> None:
    port = free_port("127.0.0.8")
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.", "20 mx2.dest.test.")
    dns_server.add("mx1.dest.test", "A", "127.0.0.8")
    dns_server.add("mx2.dest.test", "A", "127.0.0.9")
    route = {"name": "mx", "nextHop": {"kind": "mx", "port": port}}
    scheduler = await h.scheduler(make_config(h.tmp_path, [route], nameserver=dns_server.nameserver))
    queue_id = await store(h.spool, ["a@dest.test"])
    await run(scheduler, queue_id)
    found = h.spool.read(queue_id)
    assert found is not None and found[0] == "deferred"
    assert found[1].entry.results[0].status == "4.4.1"
    assert found[1].entry.results[0].remote_mta == "mx2.dest.test"


# --------------------------------------------------------------------------- intake flow control


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


async def test_room_closes_while_dispatched_mail_waits_for_a_connection(
    h: Harness, silent: tuple[SilentServer, int]
) -> None:
    """Delivery slots to spare (maxConcurrency 100) but one connection per destination: the
    messages dispatched and waiting for that connection count against the intake room, so new
    mail is held rather than piling up behind the destination."""
    _server, port = silent
    config = make_config(
        h.tmp_path,
        [{"name": "all", "nextHop": relay_hop(port)}],
        maxConcurrency=100,
        maxPerDestination=2,
        commandTimeout="2s",
    )
    scheduler = await h.scheduler(config)
    ids = [await store(h.spool, ["a@dest.test"]) for _ in range(4)]
    for queue_id in ids:
        scheduler.notify(queue_id)  # all four dispatched: two hang on the connections, two wait
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert await scheduler.room_for_intake(timeout=0.05) is False
    # the hung transactions time out (2 s) and hand their connections on: nobody waits
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
