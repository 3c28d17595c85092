"""Scheduler (Postfix's qmgr): claims due messages from the spool and delivers them.

The process shell (relay.app) builds one per worker process::

    scheduler = Scheduler(config, spool, resolver=None, client=None, clock=None)
    await scheduler.start()        # picks up incoming/ and due deferred/ mail, then rescans
    scheduler.notify(queue_id)     # the front stored a new message: deliver it soon
    await scheduler.room_for_intake()  # the front, before its 250: wait while new mail piles up
    scheduler.update_config(new)   # route reload: queued and future mail use the new routes
    await scheduler.stop(grace)    # finish in-flight deliveries, leave the rest on disk
    Scheduler(..., on_settled=hook)  # awaited with each attempt's settlement, before it is recorded
    scheduler.stats                # {"delivered": n, "deferred": n, "bounced": n} (recipients)

One attempt at one message:
1. claim it (an atomic rename into active/: worker processes sharing the spool never deliver
   the same message twice);
2. route every pending recipient with the current route table (relay.core.routing) and group them
   by route and destination: one transaction per group, many RCPTs;
3. deliver each group through its hops (relay.hops: nextHop then failover, MX hosts in order);
4. settle (relay.core.settle): expired deferrals bounce with 4.4.7, the DSN owed is chosen,
   and the message is either done or deferred with exponential backoff (relay.core.policy);
5. store the RFC 3464 DSN (relay.core.dsn) as a new message from ``<>`` *before* the original
   leaves active/ (a crash can duplicate a DSN, never lose one);
6. ``spool.defer`` (next attempt time in the file's mtime) or ``spool.complete``. When even the
   deferral cannot be written (a full spool), the claimed file goes back to deferred/ unchanged
   (``spool.requeue_unchanged``), retried until that works.

The parts, along qmgr's lines: relay.dispatch (the active queue: at most ``queue.maxConcurrency``
messages in flight per process, and intake flow control, Postfix's ``in_flow_delay``),
relay.scan (when incoming/ and deferred/ are listed), relay.hops (the transports: SMTP through
the injected client, relay.delivery, at most ``queue.maxPerDestination`` connections per
destination or gateway; gateways through relay.gateways.cache). This module wires them and
records each attempt; the decisions live in the pure modules. Time comes from the injected
`clock` (epoch seconds), so backoff and expiry are testable; the SMTP client and the resolver
can be injected too (the scheduler then neither updates nor closes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from relay import logs, metrics
from relay.config import RelayConfig
from relay.core import dsn, outcome, policy, routing
from relay.core.model import Message, QueueEntry
from relay.core.settle import Attempted, Settlement, settle, summary
from relay.delivery import SmtpClient
from relay.dispatch import IN_FLOW_DELAY, Dispatcher
from relay.dns import DnsResolver, Resolver
from relay.gateways.cache import GatewayCache
from relay.hops import Hops, SmtpDelivery
from relay.mta_sts import MtaSts
from relay.scan import Scanner
from relay.spool import CorruptEntryError, Spool, SpoolError, new_queue_id
from relay.throttle import Limiter

log = logging.getLogger(__name__)

DELAY_WARNING_AFTER = 4 * 3600.0  # NOTIFY=DELAY: report a recipient still deferred after this long
UNROUTED = "(none)"
# Told each attempt's settlement before the spool records it (relay.message_status, relay.events).
SettleHook = Callable[[QueueEntry, Settlement], Awaitable[None]]


class Scheduler:
    """Drains one relay's spool; safe to run in several worker processes on one spool."""

    def __init__(
        self,
        config: RelayConfig,
        spool: Spool,
        *,
        resolver: Resolver | None = None,
        client: SmtpDelivery | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        scan_interval: float = 5.0,
        delay_warning_after: float = DELAY_WARNING_AFTER,
        on_settled: SettleHook | None = None,
    ) -> None:
        self._config = config
        self._spool = spool
        self._own_resolver = resolver is None
        self._resolver: Resolver | None = resolver
        self._own_client: SmtpClient | None = None
        if client is None:
            client = self._own_client = SmtpClient(config.hostname, config.queue)
        self._clock = clock or time.time
        self._delay_warning_after = delay_warning_after
        self._on_settled = on_settled
        self._gateways = GatewayCache()
        self._limiter = Limiter(max_concurrency=lambda: self._config.queue.max_concurrency)
        self._hops = Hops(
            lambda: self._config,
            client,
            lambda: self.resolver,
            self._gateways,
            rng or random.Random(),
            self._limiter,
            MtaSts(lambda: self.resolver),
        )
        self._dispatcher = Dispatcher(
            self._run,
            lambda: self._config.queue.max_concurrency,
            intake_room=lambda: min(
                self._config.queue.max_concurrency, self._config.queue.max_per_destination
            ),
            waiting=lambda: self._limiter.connection_waiters,
        )
        self._limiter.on_waiters = self._dispatcher.check_room
        self._scanner = Scanner(spool, self._clock, scan_interval)
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stats = {"delivered": 0, "deferred": 0, "bounced": 0, "dsn": 0}

    # ----------------------------------------------------------------- public interface

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = DnsResolver(self._config.dns)
        return self._resolver

    @property
    def _stopping(self) -> bool:
        return self._dispatcher.stopping

    async def start(self) -> None:
        """Pick up everything already in incoming/ and due in deferred/, then keep rescanning."""
        if self._started:
            return
        self._started = True
        self._wake = asyncio.Event()
        self._dispatcher.start()
        self._scanner.scan_now(self._dispatcher.enqueue)
        self._tasks = [
            asyncio.create_task(self._dispatcher.run(), name="scheduler-dispatch"),
            asyncio.create_task(
                self._scanner.run(self._dispatcher.enqueue, self._wake, lambda: self._stopping, self._prune),
                name="scheduler-scan",
            ),
        ]

    def notify(self, queue_id: str) -> None:
        """A new message was stored in incoming/: claim and deliver it soon."""
        self._dispatcher.notify(queue_id)

    async def room_for_intake(self, timeout: float = IN_FLOW_DELAY) -> bool:  # noqa: ASYNC109
        """Return once fewer than ``maxPerDestination`` (or ``maxConcurrency``, the smaller)
        messages wait to be sent (relay.dispatch), or after `timeout` seconds; False when it
        timed out (the caller answers anyway)."""
        return await self._dispatcher.room_for_intake(timeout)

    def wake(self) -> None:
        """Rescan the spool now (after `mailrelay queue retry`, or a test advancing its clock)."""
        if self._wake is not None:
            self._wake.set()

    def update_config(self, config: RelayConfig) -> None:
        """Swap the route table and settings; deliveries in flight finish with the routes they
        started with, everything claimed later uses the new ones."""
        old = self._config
        self._config = config
        if self._own_client is not None:
            self._own_client.update(config.hostname, config.queue)
        if self._own_resolver and config.dns != old.dns:
            self._resolver = None
        self._gateways.retain(config)

    async def rescan(self) -> None:
        """Scan the spool now and queue what is due (the periodic scan does the same)."""
        await self._scanner.rescan(self._dispatcher.enqueue)

    async def wait_idle(self) -> None:
        """Return once nothing is queued for dispatch and nothing is in flight."""
        await self._dispatcher.wait_idle()

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 (the shell passes its grace period)
        """Stop claiming, let in-flight deliveries finish within `timeout`, leave the rest on disk.

        A delivery still running at the deadline is cancelled; its message stays in active/ and
        the spool's recovery puts it back in incoming/ on the next start."""
        self._dispatcher.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._dispatcher.drain(timeout)
        if self._own_client is not None:
            await self._own_client.close()
        await self._gateways.close()
        self._limiter.table.close()

    def _prune(self) -> None:
        if self._own_client is not None:
            self._own_client.prune()

    # ----------------------------------------------------------------- one message

    async def _run(self, queue_id: str) -> None:
        try:
            # due_by: the id may have been seen in incoming/ (or with an old next-attempt time)
            # before another worker attempted and deferred it; then it is not due yet
            message = await self._spool.claim(queue_id, due_by=self._clock())
        except CorruptEntryError as exc:
            log.error("[%s] %s", queue_id, exc)
            return
        except (SpoolError, OSError) as exc:
            log.error("[%s] cannot claim: %s", queue_id, exc)
            return
        if message is None:
            return  # another worker took it, or an operator deleted it
        try:
            await self._attempt(message)
        except asyncio.CancelledError:
            raise
        except SpoolError as exc:  # full or read-only spool while recording the outcome
            log.error("[%s] cannot record the attempt: %s; deferring", queue_id, exc)
            await self._defer_after_crash(message)
        except Exception:
            log.exception("[%s] delivery attempt failed unexpectedly; deferring", queue_id)
            await self._defer_after_crash(message)

    async def _attempt(self, message: Message) -> None:
        entry = message.entry
        config = self._config
        plan = routing.plan_routes(config.ordered_routes(), entry.envelope.mail_from, entry.pending)
        log.debug("[%s] attempt %d: %d groups", entry.queue_id, entry.attempts + 1, len(plan.groups))
        text = "no route matches this recipient (waiting for a route)"
        results = [Attempted(outcome.deferred(r, "4.4.4", text), UNROUTED) for r in plan.unrouted]
        if plan.unrouted:
            log.warning("[%s] %d recipients match no route", entry.queue_id, len(plan.unrouted))
        groups = await asyncio.gather(*(self._hops.deliver_group(message, group) for group in plan.groups))
        for group_results in groups:
            results.extend(group_results)
        now = self._clock()
        settlement = settle(
            entry, results, now=now, retry=config.queue.retry, delay_warning_after=self._delay_warning_after
        )
        await self._record(message, settlement, now)

    async def _record(self, message: Message, settlement: Settlement, now: float) -> None:
        """Count, store the DSN, then complete or defer (in that order)."""
        entry = message.entry
        for result in settlement.results:
            self._count(entry, result, now)
        if self._on_settled is not None:  # status records, delivery events: never stop mail
            try:
                await self._on_settled(entry, settlement)
            except Exception:
                log.exception("[%s] settle hook failed", entry.queue_id)
        if settlement.reports:
            await self._queue_dsn(message, settlement.reports, now)
        updated = settlement.deferred
        if updated is None:
            await self._spool.complete(entry.queue_id)
            if logs.per_recipient():
                self._log_events(entry, settlement, now)
            else:
                log.info("[%s] done: %s", entry.queue_id, summary(settlement.results))
            return
        await self._spool.defer(updated, message.content)
        self._scanner.deferred_here(updated.next_attempt)
        if logs.per_recipient():
            self._log_events(entry, settlement, now)
            return
        log.info(
            "[%s] deferred %d recipients until %s (attempt %d): %s",
            entry.queue_id,
            len(updated.pending),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(updated.next_attempt)),
            updated.attempts,
            summary(settlement.results),
        )

    def _log_events(self, entry: QueueEntry, settlement: Settlement, now: float) -> None:
        """One event line per recipient (relay.logs; the JSON format only)."""
        if not log.isEnabledFor(logging.INFO):
            return
        duration = round(max(0.0, now - entry.arrival), 3)
        attempts = entry.attempts + 1
        for result in settlement.results:
            result_outcome = result.outcome
            event = "expired" if result.expired else result_outcome.disposition.value
            log.info(
                "[%s] %s <%s> %d %s %s",
                entry.queue_id,
                event,
                result_outcome.recipient.address,
                result_outcome.code,
                result_outcome.status,
                result_outcome.text,
                extra={
                    "event": event,
                    "queue_id": entry.queue_id,
                    "sender": entry.envelope.mail_from,
                    "recipient": result_outcome.recipient.address,
                    "route": result.route,
                    "next_hop": result_outcome.remote_mta,
                    "code": result_outcome.code,
                    "dsn": result_outcome.status,
                    "reply": result_outcome.text,
                    "duration": duration,
                    "attempts": attempts,
                },
            )

    def _count(self, entry: QueueEntry, result: Attempted, now: float) -> None:
        disposition = result.outcome.disposition.value
        self._stats[disposition] += 1
        if disposition == "delivered":
            metrics.DELIVERED.labels(route=result.route).inc()
            metrics.DELIVERY_SECONDS.labels(route=result.route).observe(max(0.0, now - entry.arrival))
        elif disposition == "deferred":
            metrics.DEFERRED.labels(route=result.route).inc()
        else:
            metrics.BOUNCED.labels(route=result.route).inc()

    async def _queue_dsn(self, message: Message, reports: tuple[dsn.Report, ...], now: float) -> None:
        entry = message.entry
        queue_id = new_queue_id()
        retry_until = policy.expires_at(entry.arrival, self._config.queue.retry)
        try:
            content = dsn.build_dsn(
                entry,
                message.content,
                reports,
                reporting_mta=self._config.hostname,
                now=now,
                message_id=f"{queue_id}.dsn",
                retry_until=retry_until,
            )
            envelope = dsn.envelope_for(entry, content)
            dsn_entry = QueueEntry(
                queue_id=queue_id,
                envelope=envelope,
                arrival=now,
                pending=envelope.recipients,
                client_address="",
                helo=self._config.hostname,
            )
            await self._spool.store(dsn_entry, content)
        except SpoolError as exc:
            # Full or read-only spool: the original must not complete without its DSN. The
            # attempt is deferred as a whole (a delivered recipient may get a duplicate on the
            # retry; a lost bounce would be worse).
            log.error("[%s] could not queue the DSN for %d recipients: %s", entry.queue_id, len(reports), exc)
            raise
        except Exception:
            log.exception("[%s] could not queue the DSN for %d recipients", entry.queue_id, len(reports))
            return
        self._stats["dsn"] += 1
        log.info(
            "[%s] DSN %s queued to <%s>: %s",
            entry.queue_id,
            queue_id,
            entry.envelope.mail_from,
            ", ".join(f"{r.outcome.recipient.address} {r.action}" for r in reports),
            extra={
                "event": "dsn",
                "queue_id": entry.queue_id,
                "dsn_id": queue_id,
                "recipient": entry.envelope.mail_from,
                "reply": ", ".join(f"{r.outcome.recipient.address} {r.action}" for r in reports),
            },
        )
        self._dispatcher.enqueue(queue_id)

    async def _defer_after_crash(self, message: Message) -> None:
        """The attempt could not be recorded: defer the message as it was claimed, one attempt
        more. A full (or read-only) spool cannot take the rewritten file, but the claimed one is
        still intact: put it back into deferred/ unchanged, and keep trying until that works."""
        entry = message.entry
        attempts = entry.attempts + 1
        retry = self._config.queue.retry
        next_attempt = policy.next_attempt(self._clock(), entry.arrival, attempts, retry)
        try:
            await self._spool.defer(
                entry.with_changes(attempts=attempts, next_attempt=next_attempt), message.content
            )
            self._scanner.deferred_here(next_attempt)
            return
        except SpoolError as exc:
            log.error("[%s] could not write the deferral: %s", entry.queue_id, exc)
        except Exception:
            log.exception("[%s] could not write the deferral", entry.queue_id)
        delay = max(retry.min_backoff, 1.0)
        while True:
            try:
                await self._spool.requeue_unchanged(entry.queue_id, next_attempt)
            except SpoolError as exc:
                if self._stopping:
                    log.error("[%s] stays in active/ until the next start: %s", entry.queue_id, exc)
                    return
                await asyncio.sleep(delay)
                next_attempt = self._clock() + delay
                continue
            self._scanner.deferred_here(next_attempt)
            log.warning("[%s] deferred unchanged (attempt %d) after a spool error", entry.queue_id, attempts)
            return
