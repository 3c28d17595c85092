"""Scheduler (Postfix's qmgr): claims due messages from the spool and delivers them.

The process shell (relay.app) builds one per worker process::

    scheduler = Scheduler(config, spool, resolver=None, clock=None)
    await scheduler.start()        # picks up incoming/ and due deferred/ mail, then rescans
    scheduler.notify(queue_id)     # the front stored a new message: deliver it soon
    await scheduler.room_for_intake()  # the front, before its 250: wait while new mail piles up
    scheduler.update_config(new)   # route reload: queued and future mail use the new routes
    await scheduler.stop(grace)    # finish in-flight deliveries, leave the rest on disk
    scheduler.stats                # {"delivered": n, "deferred": n, "bounced": n} (recipients)

One attempt at one message:
1. claim it (an atomic rename into active/: worker processes sharing the spool never deliver
   the same message twice);
2. route every pending recipient with the current route table (relay.core.routing) and group them
   by route and destination: one transaction per group, many RCPTs;
3. try the route's hops in order (nextHop, then failover) for the recipients still deferred:
   a hop that is unreachable or answers 4xx passes its recipients to the next hop. For an MX
   hop the domain's MX hosts (relay.core.mx, via relay.dns) are tried in order, every address of a
   host, the next one after a connection failure or a 4xx;
4. record each recipient's outcome (relay.core.outcome): delivered and bounced recipients are done;
   deferred ones are rescheduled with exponential backoff (relay.core.policy); after maxLifetime
   they bounce with 4.4.7;
5. write an RFC 3464 DSN (relay.core.dsn) for what is owed to the sender and store it in the spool as
   a new message from ``<>`` (never about a message from ``<>``) *before* the original leaves
   active/ (a crash can duplicate a DSN, never lose one);
6. ``spool.defer`` (next attempt time in the file's mtime) or ``spool.complete``.

Limits: at most ``queue.maxConcurrency`` messages in flight per process, at most
``queue.maxPerDestination`` connections (and transactions) per SMTP destination or gateway.
Connections are pooled in relay.delivery and reused across messages.

Rescans: incoming/ every few seconds (a safety net; fronts notify new mail at once); deferred/,
whose listing costs O(queue), only when something there may be due: at the earliest due time
the last listing saw, when this process's own deferrals come due, and every
`DEFERRED_SCAN_INTERVAL` for other workers' deferrals (measured: listing a 100,000-message
queue every 5 s made the per-message cost grow 1.33x from 10,000 to 100,000 queued).

Intake flow control (Postfix's ``in_flow_delay``): when more than ``queue.maxConcurrency`` new
messages wait for a delivery slot, `room_for_intake` holds the front's 250 until one is taken,
for at most `IN_FLOW_DELAY` seconds per message. The message is already durable; the clients
are only slowed to the rate the relay delivers at, so new mail waits seconds, not minutes,
behind a backlog (measured: at 50 sessions the median latency was 3.9 s without it). A backlog
of deferred mail coming due does not count: only mail stored since the last dispatch does.

No delivery decision is made here beyond sequencing; the decisions live in the pure modules.
Time comes from the injected `clock` (epoch seconds), so backoff and expiry are testable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay import metrics
from relay.config import GatewayHop, MxHop, NextHop, RejectHop, RelayConfig, RelayHop, SmarthostHop
from relay.core import dsn, outcome, policy, routing
from relay.core import mx as mxplan
from relay.core.model import (
    DeliveryRequest,
    Disposition,
    Message,
    QueueEntry,
    Recipient,
    RecipientOutcome,
    Transport,
)
from relay.delivery import SmtpClient, SmtpTarget, target_for_hop
from relay.dns import DnsResolver, Resolver
from relay.spool import CorruptEntryError, Spool, SpoolError, new_queue_id

log = logging.getLogger(__name__)

MAX_MX_HOSTS = 10  # hosts of one domain tried per attempt
MAX_ADDRESSES_PER_HOST = 4
DEFERRED_SCAN_INTERVAL = 60.0  # list deferred/ at least this often (sooner when something is due)
IN_FLOW_DELAY = 1.0  # seconds the front may hold one 250 while new mail piles up (Postfix's default)
DELAY_WARNING_AFTER = 4 * 3600.0  # NOTIFY=DELAY: report a recipient still deferred after this long
UNROUTED = "(none)"


@dataclass(frozen=True)
class _Result:
    """One recipient's outcome of this attempt, with where it went."""

    outcome: RecipientOutcome
    route: str
    final_delivery: bool = False  # stored by a gateway (a DSN "delivered", not "relayed")


class _Idle:
    """Lets tests (and stop) await "nothing queued, nothing in flight"."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.event.set()


class Scheduler:
    """Drains one relay's spool; safe to run in several worker processes on one spool."""

    def __init__(
        self,
        config: RelayConfig,
        spool: Spool,
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        scan_interval: float = 5.0,
        delay_warning_after: float = DELAY_WARNING_AFTER,
    ) -> None:
        self._config = config
        self._spool = spool
        self._own_resolver = resolver is None
        self._resolver: Resolver | None = resolver
        self._clock = clock or time.time
        self._rng = rng or random.Random()
        self._scan_interval = scan_interval
        self._delay_warning_after = delay_warning_after
        self._client = SmtpClient(config.hostname, config.queue)
        self._gateways: dict[str, Transport] = {}
        self._gateway_limits: dict[str, asyncio.Semaphore] = {}
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._fresh: set[str] = set()  # notified by a front, not yet dispatched
        self._room = asyncio.Event()  # set while len(_fresh) leaves room for intake
        self._room.set()
        # next-attempt times of deferred messages seen by the last scan (ids and floats only:
        # the queue itself stays on disk); a rescan stats only names it has not seen
        self._known_due: dict[str, float] = {}
        # deferred/ is listed (O(queue)) only when something there may be due: at the earliest
        # due time the last listing saw, at the earliest of this process's own deferrals since,
        # and at least every DEFERRED_SCAN_INTERVAL (other workers' deferrals); incoming/ is
        # listed at every scan
        self._deferred_scan_at = 0.0
        self._listed_next_due: float | None = None
        self._own_next_due: float | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._wake: asyncio.Event | None = None
        self._idle: _Idle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._started = False
        self._stats = {"delivered": 0, "deferred": 0, "bounced": 0, "dsn": 0}

    # ----------------------------------------------------------------- public interface

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    @property
    def smtp_client(self) -> SmtpClient:
        return self._client

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = DnsResolver(self._config.dns)
        return self._resolver

    async def start(self) -> None:
        """Pick up everything already in incoming/ and due in deferred/, then keep rescanning."""
        if self._started:
            return
        self._started = True
        self._slots = asyncio.Semaphore(self._config.queue.max_concurrency)
        self._wake = asyncio.Event()
        self._idle = _Idle()
        self._update_idle()
        self._scan()
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="scheduler-dispatch"),
            asyncio.create_task(self._scan_loop(), name="scheduler-scan"),
        ]

    def notify(self, queue_id: str) -> None:
        """A new message was stored in incoming/: claim and deliver it soon."""
        if self._enqueue(queue_id):
            self._fresh.add(queue_id)
            if len(self._fresh) >= self._config.queue.max_concurrency:
                self._room.clear()

    async def room_for_intake(self, timeout: float = IN_FLOW_DELAY) -> bool:  # noqa: ASYNC109
        """Return once fewer than ``maxConcurrency`` new messages wait for a delivery slot, or
        after `timeout` seconds; False when it timed out (the caller answers anyway)."""
        if self._room.is_set():
            return True
        metrics.INTAKE_DELAYED.inc()
        try:
            await asyncio.wait_for(self._room.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def wake(self) -> None:
        """Rescan the spool now (after `mailrelay queue retry`, or a test advancing its clock)."""
        if self._wake is not None:
            self._wake.set()

    def update_config(self, config: RelayConfig) -> None:
        """Swap the route table and settings; deliveries in flight finish with the routes they
        started with, everything claimed later uses the new ones."""
        old = self._config
        self._config = config
        self._client.update(config.hostname, config.queue)
        if self._own_resolver and config.dns != old.dns:
            self._resolver = None
        wanted = {
            _gateway_key(hop)
            for route in config.routes
            for hop in routing.route_hops(route)
            if isinstance(hop, GatewayHop)
        }
        for key in [k for k in self._gateways if k not in wanted]:
            transport = self._gateways.pop(key)
            self._gateway_limits.pop(key, None)
            try:
                task = asyncio.get_running_loop().create_task(transport.close())
            except RuntimeError:  # no running loop (a synchronous caller): nothing to await on
                continue
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(_log_task_error)

    async def rescan(self) -> None:
        """Scan the spool now and queue what is due (the periodic scan does the same)."""
        ids, _next_due, _depth = await asyncio.to_thread(self._scan_dirs)
        for queue_id in ids:
            self._enqueue(queue_id)

    async def wait_idle(self) -> None:
        """Return once nothing is queued for dispatch and nothing is in flight."""
        if self._idle is None:
            return
        while not self._idle.event.is_set():
            await self._idle.event.wait()

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 (the shell passes its grace period)
        """Stop claiming, let in-flight deliveries finish within `timeout`, leave the rest on disk.

        A delivery still running at the deadline is cancelled; its message stays in active/ and
        the spool's recovery puts it back in incoming/ on the next start."""
        self._stopping = True
        self._room.set()  # fronts still finishing transactions must not wait for room
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        inflight = list(self._inflight.values())
        if inflight:
            _done, pending = await asyncio.wait(inflight, timeout=max(timeout, 0.0))
            for task in pending:
                task.cancel()
            if pending:
                log.warning("stop: %d deliveries cancelled at the deadline", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self._client.close()
        for transport in list(self._gateways.values()):
            try:
                await transport.close()
            except Exception:
                log.exception("closing a gateway failed")
        self._gateways.clear()

    # ----------------------------------------------------------------- queueing

    def _enqueue(self, queue_id: str) -> bool:
        if self._stopping or queue_id in self._queued or queue_id in self._inflight:
            return False
        self._queued.add(queue_id)
        self._ready.put_nowait(queue_id)
        self._update_idle()
        return True

    def _update_idle(self) -> None:
        if self._idle is None:
            return
        if self._queued or self._inflight:
            self._idle.event.clear()
        else:
            self._idle.event.set()

    def _next_deferred_scan(self) -> float:
        """When deferred/ must be listed next (clock time)."""
        times = (self._deferred_scan_at, self._listed_next_due, self._own_next_due)
        return min(t for t in times if t is not None)

    def _deferred_here(self, next_attempt: float) -> None:
        """This process deferred a message: list deferred/ again when it comes due."""
        if self._own_next_due is None or next_attempt < self._own_next_due:
            self._own_next_due = next_attempt

    def _scan_dirs(self, full: bool = True) -> tuple[list[str], float | None, dict[str, int]]:
        """Ids in incoming/ and (when `full`) due in deferred/, the next due time there, and the
        queue depth. Blocking directory walks: run in a thread."""
        now = self._clock()
        ids = self._spool.ids("incoming")
        next_due: float | None = None
        if not full:
            return ids, None, self._spool.depth()
        seen: dict[str, float] = {}
        for queue_id, due in self._spool.scan_deferred(self._known_due):
            if due <= now:
                ids.append(queue_id)  # due: claimed soon, so its time is not remembered
                continue
            seen[queue_id] = due
            if next_due is None or due < next_due:
                next_due = due
        self._known_due = seen
        return ids, next_due, self._spool.depth()

    def _scan(self) -> None:
        """Queue everything in incoming/ and everything due in deferred/ (at start)."""
        now = self._clock()
        ids, next_due, depth = self._scan_dirs()
        self._listed(now, next_due, self._own_next_due)
        for queue_id in ids:
            self._enqueue(queue_id)
        for state, count in depth.items():
            metrics.QUEUE_DEPTH.labels(state=state).set(count)

    def _listed(self, started: float, next_due: float | None, own_before: float | None) -> None:
        """Deferred/ was listed (the listing began at `started`)."""
        self._deferred_scan_at = started + DEFERRED_SCAN_INTERVAL
        self._listed_next_due = next_due
        if self._own_next_due == own_before:  # no deferral of ours since the listing began
            self._own_next_due = None

    async def _scan_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            try:
                now = self._clock()
                full = now >= self._next_deferred_scan()
                own_before = self._own_next_due
                ids, next_due, depth = await asyncio.to_thread(self._scan_dirs, full)
                if full:
                    self._listed(now, next_due, own_before)
                for queue_id in ids:
                    self._enqueue(queue_id)
                for state, count in depth.items():
                    metrics.QUEUE_DEPTH.labels(state=state).set(count)
                self._client.prune()
            except Exception:
                log.exception("spool scan failed")
            delay = min(self._scan_interval, max(0.05, self._next_deferred_scan() - self._clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _dispatch_loop(self) -> None:
        assert self._slots is not None
        while not self._stopping:
            queue_id = await self._ready.get()
            await self._slots.acquire()
            self._queued.discard(queue_id)
            self._fresh.discard(queue_id)
            if len(self._fresh) < self._config.queue.max_concurrency:
                self._room.set()
            if self._stopping:
                self._slots.release()
                break
            task = asyncio.create_task(self._run(queue_id), name=f"deliver-{queue_id}")
            self._inflight[queue_id] = task
            task.add_done_callback(functools.partial(self._finished, queue_id))

    def _finished(self, queue_id: str, _task: asyncio.Task[None] | None = None) -> None:
        self._inflight.pop(queue_id, None)
        if self._slots is not None:
            self._slots.release()
        self._update_idle()

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

    async def _defer_after_crash(self, message: Message) -> None:
        entry = message.entry
        now = self._clock()
        attempts = entry.attempts + 1
        retry = self._config.queue.retry
        next_attempt = policy.next_attempt(now, entry.arrival, attempts, retry)
        try:
            await self._spool.defer(
                entry.with_changes(attempts=attempts, next_attempt=next_attempt), message.content
            )
            self._deferred_here(next_attempt)
            return
        except SpoolError as exc:
            log.error("[%s] could not write the deferral: %s", entry.queue_id, exc)
        except Exception:
            log.exception("[%s] could not write the deferral", entry.queue_id)
        # A full (or read-only) spool cannot take a new queue file, but the claimed one is still
        # intact: put it back into deferred/ unchanged (a rename and an mtime need no free
        # space), so it is retried without a restart. Until that works, keep trying.
        delay = max(retry.min_backoff, 1.0)
        while True:
            try:
                await asyncio.to_thread(self._requeue_unchanged, entry.queue_id, next_attempt)
            except OSError as exc:
                if self._stopping:
                    log.error("[%s] stays in active/ until the next start: %s", entry.queue_id, exc)
                    return
                await asyncio.sleep(delay)
                next_attempt = self._clock() + delay
                continue
            self._deferred_here(next_attempt)
            log.warning("[%s] deferred unchanged (attempt %d) after a spool error", entry.queue_id, attempts)
            return

    def _requeue_unchanged(self, queue_id: str, next_attempt: float) -> None:
        """Move a claimed message from active/ back to deferred/ as it is, due at `next_attempt`.
        Blocking: run in a thread."""
        active = self._spool.path("active", queue_id)
        os.utime(active, (next_attempt, next_attempt))
        os.rename(active, self._spool.path("deferred", queue_id))

    async def _attempt(self, message: Message) -> None:
        entry = message.entry
        config = self._config
        plan = routing.plan_routes(config.ordered_routes(), entry.envelope.mail_from, entry.pending)
        log.debug("[%s] attempt %d: %d groups", entry.queue_id, entry.attempts + 1, len(plan.groups))
        results: list[_Result] = [
            _Result(
                outcome.deferred(r, "4.4.4", "no route matches this recipient (waiting for a route)"),
                UNROUTED,
            )
            for r in plan.unrouted
        ]
        if plan.unrouted:
            log.warning("[%s] %d recipients match no route", entry.queue_id, len(plan.unrouted))
        groups = await asyncio.gather(*(self._deliver_group(message, group) for group in plan.groups))
        for group_results in groups:
            results.extend(group_results)
        await self._settle(message, results)

    async def _settle(self, message: Message, results: list[_Result]) -> None:
        """Record outcomes, expire, count, queue the DSN, then defer or complete."""
        entry = message.entry
        now = self._clock()
        retry = self._config.queue.retry
        expired = policy.is_expired(now, entry.arrival, retry)
        settled: list[_Result] = []
        for result in results:
            if result.outcome.disposition is Disposition.DEFERRED and expired:
                result = _Result(outcome.expire(result.outcome), result.route, result.final_delivery)
            settled.append(result)
            self._count(entry, result, now)

        late = now - entry.arrival >= self._delay_warning_after
        reports: list[dsn.Report] = []
        warned: list[str] = []
        for result in settled:
            o = result.outcome
            if o.disposition is Disposition.DEFERRED and (not late or o.recipient.address in entry.dsn_sent):
                continue
            action = dsn.action_for(o, final_delivery=result.final_delivery, delay_warning=late)
            if action is not None:
                reports.append(dsn.Report(o, action))
                if action == "delayed":
                    warned.append(o.recipient.address)
        if reports and entry.envelope.mail_from != "":
            await self._queue_dsn(message, reports, now)

        pending = tuple(r.outcome.recipient for r in settled if r.outcome.disposition is Disposition.DEFERRED)
        if not pending:
            await self._spool.complete(entry.queue_id)
            log.info("[%s] done: %s", entry.queue_id, _summary(settled))
            return
        attempts = entry.attempts + 1
        by_address = {o.recipient.address: o for o in entry.results}
        for result in settled:
            by_address[result.outcome.recipient.address] = result.outcome
        updated = entry.with_changes(
            pending=pending,
            attempts=attempts,
            next_attempt=policy.next_attempt(now, entry.arrival, attempts, retry),
            results=tuple(by_address.values()),
            dsn_sent=tuple(dict.fromkeys((*entry.dsn_sent, *warned))),
        )
        await self._spool.defer(updated, message.content)
        self._deferred_here(updated.next_attempt)
        log.info(
            "[%s] deferred %d recipients until %s (attempt %d): %s",
            entry.queue_id,
            len(pending),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(updated.next_attempt)),
            attempts,
            _summary(settled),
        )

    def _count(self, entry: QueueEntry, result: _Result, now: float) -> None:
        o = result.outcome
        if o.disposition is Disposition.DELIVERED:
            self._stats["delivered"] += 1
            metrics.DELIVERED.labels(route=result.route).inc()
            metrics.DELIVERY_SECONDS.labels(route=result.route).observe(max(0.0, now - entry.arrival))
        elif o.disposition is Disposition.DEFERRED:
            self._stats["deferred"] += 1
            metrics.DEFERRED.labels(route=result.route).inc()
        else:
            self._stats["bounced"] += 1
            metrics.BOUNCED.labels(route=result.route).inc()

    async def _queue_dsn(self, message: Message, reports: list[dsn.Report], now: float) -> None:
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
        )
        self._enqueue(queue_id)

    # ----------------------------------------------------------------- one route group

    async def _deliver_group(self, message: Message, group: routing.RouteGroup) -> list[_Result]:
        """Try the group's hops in order; recipients deferred at one hop go to the next."""
        route = group.route.name
        pending: list[Recipient] = list(group.recipients)
        done: list[_Result] = []
        last: dict[str, _Result] = {}
        for hop in group.hops:
            if not pending:
                break
            outcomes = await self._deliver_hop(message, hop, group.domain, pending)
            final_delivery = isinstance(hop, GatewayHop)
            still: list[Recipient] = []
            for o in outcomes:
                result = _Result(o, route, final_delivery and o.disposition is Disposition.DELIVERED)
                if o.disposition is Disposition.DEFERRED:
                    still.append(o.recipient)
                    last[o.recipient.address] = result
                else:
                    done.append(result)
            if still:
                log.info(
                    "[%s] %s: %d recipients deferred at %s%s",
                    message.entry.queue_id,
                    route,
                    len(still),
                    routing.hop_label(hop),
                    "; trying the next hop" if hop is not group.hops[-1] else "",
                )
            pending = still
        done.extend(last[r.address] for r in pending)
        return done

    async def _deliver_hop(
        self, message: Message, hop: NextHop, domain: str, recipients: list[Recipient]
    ) -> list[RecipientOutcome]:
        request = DeliveryRequest(message=message, recipients=tuple(recipients))
        if isinstance(hop, RejectHop):
            return [_rejected(r, hop) for r in recipients]
        if isinstance(hop, RelayHop | SmarthostHop):
            return outcome.one_each(recipients, await self._client.deliver(target_for_hop(hop), request))
        if isinstance(hop, MxHop):
            return await self._deliver_mx(message, hop, domain, recipients)
        return await self._deliver_gateway(hop, request)

    async def _deliver_gateway(self, hop: GatewayHop, request: DeliveryRequest) -> list[RecipientOutcome]:
        recipients = list(request.recipients)
        key = _gateway_key(hop)
        transport = self._gateways.get(key)
        if transport is None:
            try:
                from relay.gateways import build_gateway

                transport = build_gateway(hop, self._config)
            except Exception as exc:
                log.error("gateway %s cannot be built: %s", routing.hop_label(hop), exc)
                return [
                    outcome.deferred(r, "4.3.0", f"gateway {routing.hop_label(hop)} unavailable: {exc}")
                    for r in recipients
                ]
            self._gateways[key] = transport
        limit = self._gateway_limits.setdefault(
            key, asyncio.Semaphore(self._config.queue.max_per_destination)
        )
        async with limit:
            try:
                outcomes = await transport.deliver(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception(
                    "[%s] gateway %s raised", request.message.entry.queue_id, routing.hop_label(hop)
                )
                return [outcome.deferred(r, "4.3.0", f"gateway failed: {exc}") for r in recipients]
        return outcome.one_each(recipients, outcomes)

    async def _deliver_mx(
        self, message: Message, hop: MxHop, domain: str, recipients: list[Recipient]
    ) -> list[RecipientOutcome]:
        resolver = self.resolver
        answer = await resolver.mx(domain)
        plan = mxplan.plan_mx(domain, answer, self._rng)
        if isinstance(plan, mxplan.MxFailure):
            return [_failure(r, plan) for r in recipients]
        pending = list(recipients)
        done: dict[str, RecipientOutcome] = {}
        last: dict[str, RecipientOutcome] = {}
        failures: list[mxplan.MxFailure] = []
        tried = False
        for host in plan.hosts[:MAX_MX_HOSTS]:
            addresses = await resolver.addresses(host)
            if addresses.status is not mxplan.LookupStatus.OK or not addresses.addresses:
                failures.append(mxplan.address_failure(domain, host, plan.implicit, addresses))
                continue
            for address in addresses.addresses[:MAX_ADDRESSES_PER_HOST]:
                tried = True
                target = SmtpTarget(
                    host=address,
                    port=hop.port,
                    tls="opportunistic" if hop.tls == "opportunistic" else "none",
                    server_name=host,
                    verify=False,
                )
                request = DeliveryRequest(message=message, recipients=tuple(pending))
                outcomes = outcome.one_each(pending, await self._client.deliver(target, request))
                still = []
                for o in outcomes:
                    if o.disposition is Disposition.DEFERRED:
                        still.append(o.recipient)
                        last[o.recipient.address] = o
                    else:
                        done[o.recipient.address] = o
                pending = still
                if not pending:
                    break
            if not pending:
                break
        if not tried:
            failure = mxplan.combine_address_failures(failures)
            return [_failure(r, failure) for r in recipients]
        return [done.get(r.address) or last[r.address] for r in recipients]


# --------------------------------------------------------------------------- helpers


def _gateway_key(hop: GatewayHop) -> str:
    return hop.model_dump_json()


def _rejected(recipient: Recipient, hop: RejectHop) -> RecipientOutcome:
    return outcome.from_reply(recipient, hop.code, hop.message)


def _failure(recipient: Recipient, failure: mxplan.MxFailure) -> RecipientOutcome:
    if failure.permanent:
        return outcome.bounced(recipient, failure.status, failure.text, code=failure.code)
    return outcome.deferred(recipient, failure.status, failure.text, code=failure.code)


def _summary(results: Sequence[_Result]) -> str:
    return ", ".join(
        f"{r.outcome.recipient.address}={r.outcome.disposition.value} {r.outcome.code} {r.outcome.status}"
        for r in results
    )


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed: %s", task.exception())
