"""The delivery-event outbox: events (relay.core.events) are written to disk when an attempt
settles and POSTed to their webhooks from there, so an endpoint that is down never blocks mail.

Layout under ``<queue directory>/events/``: ``new/`` holds one JSON file per event waiting to
be sent, its mtime the time it is due; ``active/`` the ones a sender claimed (a rename: worker
processes sharing the spool never send the same file at once). `Outbox.on_settled` is the
scheduler's settle hook: it writes the attempt's events durably (write, fsync, rename, as the
spool writes mail) before the scheduler records the attempt, so a crash can repeat an event,
never lose one. `Outbox.run` is the sender: every second (or at once after new events) it
claims what is due, POSTs it (at most `CONCURRENCY` at a time, each with the webhook's timeout)
signed as relay.core.events says; a 2xx removes the file, anything else puts it back with the
next retry time, and after `relay.core.events.LIFETIME` it is dropped and logged. Claims older
than `STALE_CLAIM` (a sender that died) go back to ``new/`` when a process starts. Counted in
``mailrelay_events_total{result}``.

What it must not do: decide which events exist (relay.core.events does), or let a webhook
failure reach the scheduler (the hook only writes files; every error is logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from relay import durable, metrics
from relay.config import EventWebhookConfig, RelayConfig
from relay.core import events as rules
from relay.core.model import QueueEntry
from relay.core.settle import Settlement
from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

CONCURRENCY = 8
STALE_CLAIM = 120.0  # seconds after which a claimed event is taken to be abandoned
SCAN_INTERVAL = 1.0


def _finished(sending: set[asyncio.Task[None]], limit: asyncio.Semaphore, task: asyncio.Task[None]) -> None:
    sending.discard(task)
    limit.release()


class Outbox:
    """One spool's event outbox (shared by its worker processes)."""

    def __init__(
        self,
        queue_directory: Path,
        config: Callable[[], RelayConfig],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(queue_directory) / "events"
        self.new = self.root / "new"
        self.active = self.root / "active"
        self.tmp = self.root / "tmp"
        self._config = config
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._keys: dict[Path, tuple[float, bytes]] = {}

    # ------------------------------------------------------------------ writing

    def _wanted(self, config: RelayConfig) -> bool:
        return config.events is not None or any(route.events is not None for route in config.routes)

    async def on_settled(self, entry: QueueEntry, settlement: Settlement) -> None:
        """The scheduler's settle hook: store this attempt's events (none configured: nothing)."""
        config = self._config()
        if not self._wanted(config):
            return
        found = rules.events_for(
            entry,
            settlement,
            route_events={route.name: route.events for route in config.routes},
            default=config.events,
            now=self._clock(),
        )
        if not found:
            return
        try:
            await asyncio.to_thread(self._store, found)
        except OSError as exc:  # never stops mail; the events of this attempt are lost
            log.error("[%s] could not store %d delivery events: %s", entry.queue_id, len(found), exc)
            metrics.EVENTS.labels("lost").inc(len(found))
            return
        self._wake.set()

    def _store(self, found: list[rules.Event]) -> None:
        for directory in (self.new, self.active, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        now = self._clock()
        for event in found:
            record = {
                "webhook": event.webhook.model_dump(mode="json", by_alias=True, exclude_none=True),
                "id": event.id,
                "body": event.body,
                "attempts": 0,
                "created": now,
            }
            name = f"{event.id}.json"
            durable.commit(
                self.tmp / f"{name}.{secrets.token_hex(4)}",
                json.dumps(record).encode(),
                [self.new / name],
                fsync_before_rename=False,
                fsync_after_rename=True,
                mtime=now,
            )

    # ------------------------------------------------------------------ sending

    def start(self) -> None:
        self.recover()
        self._task = asyncio.create_task(self.run(), name="event-outbox")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def recover(self) -> int:
        """Claims older than STALE_CLAIM back to new/ (blocking; at start)."""
        moved = 0
        cutoff = self._clock() - STALE_CLAIM
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.active):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.replace(entry.path, self.new / entry.name)
                        moved += 1
        return moved

    def due(self) -> list[str]:
        """Names of the events due now (blocking)."""
        now = self._clock()
        try:
            return sorted(
                e.name for e in os.scandir(self.new) if e.name.endswith(".json") and e.stat().st_mtime <= now
            )
        except FileNotFoundError:
            return []

    async def run(self) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        sending: set[asyncio.Task[None]] = set()
        while True:
            self._wake.clear()
            try:
                names = await asyncio.to_thread(self.due)
            except OSError as exc:
                log.error("event outbox unreadable: %s", exc)
                names = []
            for name in names:
                await limit.acquire()
                task = asyncio.create_task(self._send_one(name))
                sending.add(task)
                task.add_done_callback(functools.partial(_finished, sending, limit))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SCAN_INTERVAL)

    def _claim(self, name: str) -> dict[str, Any] | None:
        target = self.active / name
        try:
            os.replace(self.new / name, target)
            os.utime(target)  # the claim's age, for recover()
            data = json.loads(target.read_bytes())
        except FileNotFoundError:
            return None  # another worker took it
        except (OSError, ValueError) as exc:
            log.error("event %s unreadable, dropped: %s", name, exc)
            with contextlib.suppress(OSError):
                target.unlink()
            return None
        return data if isinstance(data, dict) else None

    def _release(self, name: str, record: dict[str, Any], *, sent: bool) -> str:
        """After a POST: remove (sent or too old) or put back with the next due time."""
        target = self.active / name
        now = self._clock()
        if sent or now - float(record.get("created", now)) > rules.LIFETIME:
            target.unlink(missing_ok=True)
            return "sent" if sent else "dropped"
        record["attempts"] = int(record.get("attempts", 0)) + 1
        due = now + rules.retry_delay(record["attempts"])
        tmp = self.tmp / f"{name}.{secrets.token_hex(4)}"
        durable.commit(
            tmp,
            json.dumps(record).encode(),
            [target, self.new / name],
            fsync_before_rename=False,
            fsync_after_rename=True,
            mtime=due,
        )
        return "retry"

    async def _send_one(self, name: str) -> None:
        try:
            record = await asyncio.to_thread(self._claim, name)
            if record is None:
                return
            webhook = EventWebhookConfig.model_validate(record["webhook"])
            sent, detail = await self._post(webhook, record)
            result = await asyncio.to_thread(self._release, name, record, sent=sent)
        except Exception:
            log.exception("event %s: sending failed unexpectedly", name)
            return
        metrics.EVENTS.labels(result).inc()
        level = logging.INFO if sent else logging.WARNING
        log.log(level, "event %s to %s: %s (%s)", record.get("id"), webhook.url, result, detail)

    def _key(self, path: Path) -> bytes:
        stamp = path.stat().st_mtime
        cached = self._keys.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, path.read_bytes().strip())
            self._keys[path] = cached
        return cached[1]

    def _ssl(self, webhook: EventWebhookConfig) -> ssl.SSLContext | bool:
        if not webhook.url.startswith("https://"):
            return False
        context = ssl.create_default_context(cafile=str(webhook.ca_file) if webhook.ca_file else None)
        if webhook.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _post(self, webhook: EventWebhookConfig, record: dict[str, Any]) -> tuple[bool, str]:
        body = json.dumps(record["body"], sort_keys=True, separators=(",", ":")).encode()
        timestamp = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            rules.TIMESTAMP_HEADER: str(timestamp),
            rules.EVENT_ID_HEADER: str(record["id"]),
            "User-Agent": "mailrelay-events",
        }
        try:
            if webhook.secret_file is not None:
                key = await asyncio.to_thread(self._key, webhook.secret_file)
                headers[rules.SIGNATURE_HEADER] = rules.signature(key, timestamp, body)
            if self._session is None:
                self._session = aiohttp.ClientSession()
            async with self._session.post(
                webhook.url,
                data=body,
                headers=headers,
                ssl=self._ssl(webhook),
                timeout=aiohttp.ClientTimeout(total=webhook.timeout),
            ) as response:
                return 200 <= response.status < 300, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
