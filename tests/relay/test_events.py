"""Delivery events on a running relay: a real aiohttp server receives the signed POSTs (the
signature recomputed here with hmac, not with the relay's code), a real SMTP sink is the next
hop answering 250, 451 and 550; one webhook is down at first and recovers; mail never waits
for it. Plus the pure rules of relay.core.events as tables."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
from aiohttp import web
from prometheus_client import REGISTRY

from relay.config import EventsConfig, EventWebhookConfig, parse_config
from relay.core import events as rules
from relay.core import outcome
from relay.core.model import Envelope, QueueEntry, Recipient
from relay.core.settle import Attempted, settle
from tests.relay.apphelp import free_port, in_process, relay_to_sink_config, until, write_config
from tests.relay.smtpsink import GONE_AND_LATER, SmtpSink

KEY = b"event-signing-key-0123456789"
MESSAGE = b"From: app@example.com\r\nSubject: events\r\n\r\nhello\r\n"


class Receiver:
    """A webhook endpoint: records each POST; answers `status` (503 while 'failing')."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.posts.append((dict(request.headers), await request.read()))
        self.arrived.set()
        return web.Response(status=self.status, text="ok")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.posts]


def signed_correctly(headers: dict[str, str], body: bytes) -> bool:
    timestamp = headers["X-Mailrelay-Timestamp"]
    expected = "v1=" + hmac.new(KEY, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return headers["X-Mailrelay-Signature"] == expected and abs(time.time() - int(timestamp)) < 300


@contextlib.asynccontextmanager
async def relay(tmp_path: Path, sink: SmtpSink, route_url: str, relay_url: str) -> AsyncIterator[int]:
    """example.com goes to the sink over a route with its own webhook; other.example over a
    route without one, so its events go to the relay's webhook. Retries every 1-2 s, and a
    message outlives its lifetime after 4 s."""
    key = tmp_path / "event-key"
    key.write_bytes(KEY + b"\n")
    data = relay_to_sink_config(
        tmp_path,
        hostname="events.relay.test",
        domains=["example.com", "other.example"],
        sink_port=sink.port,
        events={"webhook": {"url": relay_url, "secretFile": str(key), "timeout": "5s"}},
    )
    data["queue"]["retry"]["maxLifetime"] = "4s"
    data["routes"][0]["match"]["recipientDomains"] = ["example.com"]
    data["routes"][0]["events"] = {"webhook": {"url": route_url, "secretFile": str(key)}}
    data["routes"].append(
        {**data["routes"][0], "name": "other", "match": {"recipientDomains": ["other.example"]}}
    )
    del data["routes"][1]["events"]
    async with in_process(write_config(tmp_path, data)):
        yield int(data["listeners"][0]["port"])


async def send(port: int, recipients: list[str], sender: str = "app@example.com") -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    await smtp.sendmail(sender, recipients, MESSAGE)
    await smtp.quit()


async def test_delivered_deferred_bounced_and_expired_events_are_signed(tmp_path: Path) -> None:
    sink = await SmtpSink(rcpt_replies=GONE_AND_LATER).start()
    route_hook = await Receiver().start()
    relay_hook = await Receiver().start()
    async with relay(tmp_path, sink, route_hook.url, relay_hook.url) as port:
        await send(port, ["carol@example.com", "gone@example.com", "later@example.com"])

        def kinds(receiver: Receiver) -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for event in receiver.events():
                found.setdefault(event["recipient"], set()).add(event["type"])
            return found

        await until(lambda: "expired" in kinds(route_hook).get("later@example.com", set()), timeout=60)
    by_kind = {(e["recipient"], e["type"]): e for e in route_hook.events()}
    delivered = by_kind[("carol@example.com", "delivered")]
    assert delivered["reply"]["code"] == 250 and delivered["nextHop"] and delivered["route"] == "to-sink"
    assert delivered["sender"] == "app@example.com" and delivered["queueId"]
    bounced = by_kind[("gone@example.com", "bounced")]
    assert (bounced["reply"]["code"], bounced["reply"]["enhanced"], bounced["dsnSent"]) == (
        550,
        "5.1.1",
        True,
    )
    deferred = by_kind[("later@example.com", "deferred")]
    assert deferred["reply"]["code"] == 451 and deferred["nextAttempt"].endswith("Z")
    expired = by_kind[("later@example.com", "expired")]
    assert expired["reply"]["enhanced"] == "4.4.7" and expired["dsnSent"] is True
    for headers, body in route_hook.posts:
        assert signed_correctly(headers, body), headers
        assert headers["X-Mailrelay-Event-Id"] == json.loads(body)["id"]
    assert relay_hook.posts == []  # every recipient's route had its own webhook
    await route_hook.stop()
    await relay_hook.stop()
    await sink.stop()


async def test_a_down_endpoint_never_blocks_mail_and_gets_its_events_when_it_recovers(tmp_path: Path) -> None:
    retries_before = REGISTRY.get_sample_value("mailrelay_events_total", {"result": "retry"}) or 0
    sent_before = REGISTRY.get_sample_value("mailrelay_events_total", {"result": "sent"}) or 0
    sink = await SmtpSink().start()
    route_hook = await Receiver().start()
    down = Receiver(free_port())  # nothing listens on its port yet
    async with relay(tmp_path, sink, route_hook.url, down.url) as port:
        await send(port, ["dave@other.example"])
        await asyncio.wait_for(sink.arrived.wait(), 30)  # delivered while the webhook is down
        outbox = tmp_path / "queue" / "events" / "new"

        def retried() -> bool:
            files = list(outbox.glob("*.json"))
            return bool(files) and json.loads(files[0].read_text())["attempts"] >= 1

        await until(retried)
        await down.start()
        down.status = 503  # up, but failing: still retried
        await until(lambda: len(down.posts) >= 1, timeout=60)
        down.status = 200
        await until(
            lambda: not list(outbox.glob("*.json")) and not list(outbox.parent.glob("active/*")), timeout=60
        )
    assert (
        REGISTRY.get_sample_value("mailrelay_events_total", {"result": "retry"}) or 0
    ) >= retries_before + 2
    assert REGISTRY.get_sample_value("mailrelay_events_total", {"result": "sent"}) == sent_before + 1
    ids = {headers["X-Mailrelay-Event-Id"] for headers, _ in down.posts}
    assert len(ids) == 1 and len(down.posts) >= 2  # one event, retried until a 2xx
    event = json.loads(down.posts[-1][1])
    assert (event["type"], event["recipient"], event["route"]) == ("delivered", "dave@other.example", "other")
    assert all(signed_correctly(h, b) for h, b in down.posts)
    assert route_hook.posts == []
    await down.stop()
    await route_hook.stop()
    await sink.stop()


# --------------------------------------------------------------------------- rules


def _entry() -> QueueEntry:
    recipients = (Recipient("a@x.test"), Recipient("b@y.test"), Recipient("c@y.test"))
    return QueueEntry("0123456789ABCDEF", Envelope("s@x.test", recipients), 1000.0, recipients)


def test_which_events_and_where() -> None:
    entry = _entry()
    hook_x = EventsConfig(webhook=EventWebhookConfig(url="http://127.0.0.1:1/x"))
    hook_all = EventsConfig(webhook=EventWebhookConfig(url="http://127.0.0.1:1/all"))
    results = [
        Attempted(outcome.delivered(entry.pending[0], "ok", remote_mta="mx.x.test"), "rx"),
        Attempted(outcome.deferred(entry.pending[1], "4.2.0", "busy", code=451), "ry"),
        Attempted(outcome.bounced(entry.pending[2], "5.1.1", "no such user", code=550), "ry"),
    ]
    settled = settle(
        entry,
        results,
        now=1010.0,
        retry=parse_config({"hostname": "h", "listeners": [{"name": "s", "port": 25}]}).queue.retry,
        delay_warning_after=1e9,
    )
    found = rules.events_for(
        entry, settled, route_events={"rx": hook_x, "ry": None}, default=hook_all, now=1010.0
    )
    assert [(e.webhook.url[-3:], e.body["type"], e.body["recipient"]) for e in found] == [
        ("1/x", "delivered", "a@x.test"),
        ("all", "deferred", "b@y.test"),
        ("all", "bounced", "c@y.test"),
    ]
    assert found[0].body["nextHop"] == "mx.x.test" and "nextAttempt" in found[1].body
    assert found[2].body["dsnSent"] is True
    assert len({e.id for e in found}) == 3
    assert rules.events_for(entry, settled, route_events={}, default=None, now=1010.0) == []
    # after the lifetime the deferral is an expiry
    late = settle(
        entry,
        results[1:2],
        now=1000.0 + 6 * 86400,
        retry=parse_config({"hostname": "h", "listeners": [{"name": "s", "port": 25}]}).queue.retry,
        delay_warning_after=1e9,
    )
    (expired,) = rules.events_for(entry, late, route_events={}, default=hook_all, now=0.0)
    assert expired.body["type"] == "expired" and expired.body["reply"]["enhanced"] == "4.4.7"


def test_signatures_and_retries() -> None:
    body = b'{"type":"delivered"}'
    header = rules.signature(KEY, 1_700_000_000, body)
    assert rules.verify(KEY, "1700000000", body, header, now=1_700_000_100)
    assert not rules.verify(KEY, "1700000000", body, header, now=1_700_000_000 + rules.TOLERANCE + 1)
    assert not rules.verify(KEY, "1700000000", body + b" ", header, now=1_700_000_000)
    assert not rules.verify(b"other key", "1700000000", body, header, now=1_700_000_000)
    assert not rules.verify(KEY, "17e8", body, header, now=1_700_000_000)
    assert [rules.retry_delay(n) for n in (1, 2, 3, 4, 10, 20)] == [1, 2, 4, 8, 512, 600]
