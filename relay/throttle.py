"""Rate limits and adaptive backoff per destination, shared by the workers of one relay.

relay.hops asks `Limiter.acquire(route, destination, connections)` before each SMTP transaction
and tells `Limiter.record(...)` what came of it. The arithmetic is relay.core.throttle's; this
module keeps the state and waits.

Where the state lives (the budgets must hold for the relay, not per worker process): a table of
fixed-size slots in a file mapped into every worker (`SharedTable`), one slot per bucket key,
read and written under an exclusive ``flock`` on the file (a critical section is a few
microseconds of arithmetic; no I/O happens under the lock). Decisions that write nothing read
a slot without the lock (`SharedTable.peek`): the admission on a route without limits (only the
destination's backoff decides) and the recovery check after a delivery to a calm destination,
so the common case takes no lock at all. The supervisor creates the file in
a private temporary directory and names it in ``MAILRELAY_THROTTLE_FILE`` for its workers
(relay.app); a relay with one process, and a scheduler built by a test, use an anonymous
mapping. The clock is ``time.monotonic`` (CLOCK_MONOTONIC: one clock for every process of the
machine). A table that is full evicts the slot idle for the longest time.

What stays per process: the number of deliveries waiting for one bucket (at most half of
``queue.maxConcurrency``, so one slow destination cannot take every delivery slot), the
deliveries queued for a destination's connections (first come, first served, one woken per
connection released; their number, `connection_waiters`, counts against the intake room
of relay.dispatch) and the connections in use per destination: a route's ``connections``
is split over the workers (`relay.core.throttle.per_worker`; the number of workers comes
from ``MAILRELAY_WORKERS``), and backoff scales it down. A delivery that would wait longer
than `MAX_WAIT` seconds is not held: its recipients are deferred with 451 4.7.0 and retried
with the queue's backoff.

`SenderCaps` keeps the per-sender caps of the listeners (``senderLimits``) in the same table:
the front asks it before it accepts MAIL FROM and answers 450 4.7.0 over the cap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from relay import metrics
from relay.config import RouteConfig, SenderLimits
from relay.core import throttle
from relay.core.model import Disposition, RecipientOutcome
from relay.core.throttle import Bucket

log = logging.getLogger(__name__)

ENV_FILE = "MAILRELAY_THROTTLE_FILE"
ENV_WORKERS = "MAILRELAY_WORKERS"
MAX_WAIT = 10.0  # seconds a delivery may wait for its budget while holding a delivery slot
SLOTS = 4096
PROBES = 32
_SLOT = struct.Struct("<Q6d")
_T = TypeVar("_T")


@lru_cache(maxsize=SLOTS)
def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1


def _fields(bucket: Bucket) -> tuple[float, ...]:
    """A bucket's fields in slot order (dataclasses.astuple deep-copies: the most expensive step
    of a delivery's bookkeeping before it was replaced)."""
    b = bucket
    return (b.second_tat, b.hour_tat, b.factor, b.paused_until, b.penalty, b.changed_at)


_EMPTY = _fields(Bucket())


class SharedTable:
    """Buckets by key in a shared (file) or private (anonymous) memory mapping."""

    def __init__(self, path: Path | None = None) -> None:
        size = SLOTS * _SLOT.size
        self.path = path
        self._fd: int | None = None
        if path is None:
            self._map = mmap.mmap(-1, size)
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @classmethod
    def from_environment(cls) -> SharedTable:
        name = os.environ.get(ENV_FILE)
        return cls(Path(name) if name else None)

    def close(self) -> None:
        self._map.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _slot(self, key: int) -> int:
        start = key % SLOTS
        oldest, oldest_at = start, float("inf")
        for probe in range(PROBES):
            index = (start + probe) % SLOTS
            found, *fields = _SLOT.unpack_from(self._map, index * _SLOT.size)
            if found in (key, 0):
                if found == 0:
                    _SLOT.pack_into(self._map, index * _SLOT.size, key, *_EMPTY)
                return index
            last = max(fields)
            if last < oldest_at:
                oldest, oldest_at = index, last
        _SLOT.pack_into(self._map, oldest * _SLOT.size, key, *_EMPTY)
        return oldest

    def transact(self, keys: Sequence[str], change: Callable[[list[Bucket]], tuple[list[Bucket], _T]]) -> _T:
        """Read the buckets of `keys`, let `change` compute new ones, write them: atomically."""
        with self._locked():
            slots = [self._slot(_hash(key)) for key in keys]
            buckets = [Bucket(*_SLOT.unpack_from(self._map, s * _SLOT.size)[1:]) for s in slots]
            updated, result = change(buckets)
            for slot, key, bucket in zip(slots, keys, updated, strict=True):
                _SLOT.pack_into(self._map, slot * _SLOT.size, _hash(key), *_fields(bucket))
        return result

    def get(self, key: str) -> Bucket:
        return self.transact([key], lambda buckets: (buckets, buckets[0]))

    def peek(self, key: str) -> Bucket:
        """The bucket of `key` read without the lock and without taking a slot (a fresh bucket
        when it has none). A hint for decisions that write nothing: another worker's concurrent
        write can only make it one step old."""
        key_hash = _hash(key)
        start = key_hash % SLOTS
        for probe in range(PROBES):
            found, *fields = _SLOT.unpack_from(self._map, ((start + probe) % SLOTS) * _SLOT.size)
            if found == key_hash:
                return Bucket(*fields)
            if found == 0:  # keys fill the first free slot of their probe run: no slot further on
                break
        return Bucket()


class Limiter:
    """Budgets and backoff of every SMTP destination of one scheduler."""

    def __init__(
        self,
        table: SharedTable | None = None,
        *,
        workers: int | None = None,
        max_concurrency: Callable[[], int] = lambda: 100,
        clock: Callable[[], float] = time.monotonic,
        max_wait: float = MAX_WAIT,
    ) -> None:
        self.table = table or SharedTable.from_environment()
        self.workers = workers or int(os.environ.get(ENV_WORKERS, "1") or 1)
        self._max_concurrency = max_concurrency
        self._clock = clock
        self.max_wait = max_wait
        self._waiting: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        self._factors: dict[str, float] = {}  # the factor last exported per backoff key
        # deliveries waiting for a connection, per backoff key, in arrival order: (future, cap)
        self._queues: dict[str, collections.deque[tuple[asyncio.Future[bool], int]]] = {}
        self.connection_waiters = 0  # of this process, all destinations (the intake gate counts them)
        self.on_waiters: Callable[[], None] | None = None  # told when connection_waiters changes

    @staticmethod
    def keys(route: RouteConfig, destination: str) -> tuple[str, str]:
        """(budget key, backoff key): the budget is the route's unless perDestination."""
        backoff = f"{route.name}|{destination}"
        return (backoff if route.limits.per_destination else f"{route.name}|*"), backoff

    def _admit(self, route: RouteConfig, budget: str, backoff: str) -> tuple[throttle.Admission, float]:
        """The admission of one delivery and the destination's adaptive factor."""
        now, limits, max_wait = self._clock(), route.limits, self.max_wait
        if not limits.messages_per_second and not limits.messages_per_hour:
            # No budget to reserve: only the destination's backoff decides, and nothing is
            # written, so the lock-free read will do (the common case: most routes set no limit).
            adaptive = self.table.peek(backoff)
            return throttle.admit(adaptive, limits, now, max_wait)[1], adaptive.factor
        if budget == backoff:

            def one(buckets: list[Bucket]) -> tuple[list[Bucket], tuple[throttle.Admission, float]]:
                after, admission = throttle.admit(buckets[0], limits, now, max_wait)
                return [after], (admission, after.factor)

            return self.table.transact([budget], one)

        def two(buckets: list[Bucket]) -> tuple[list[Bucket], tuple[throttle.Admission, float]]:
            rate, adaptive = buckets  # the route's budget, this destination's backoff
            view = replace(rate, factor=adaptive.factor, paused_until=adaptive.paused_until)
            after, admission = throttle.admit(view, limits, now, max_wait)
            kept = replace(rate, second_tat=after.second_tat, hour_tat=after.hour_tat)
            return [kept, adaptive], (admission, adaptive.factor)

        return self.table.transact([budget, backoff], two)

    def _adapt(self, key: str, change: Callable[[Bucket, float], Bucket]) -> Bucket:
        now = self._clock()

        def apply(buckets: list[Bucket]) -> tuple[list[Bucket], Bucket]:
            after = change(buckets[0], now)
            return [after], after

        return self.table.transact([key], apply)

    @contextlib.asynccontextmanager
    async def acquire(
        self, route: RouteConfig, destination: str, connections: int
    ) -> AsyncIterator[str | None]:
        """Wait for the budget and a connection; yields None when the delivery may go ahead,
        or the reason it may not (the caller defers with 451 4.7.0)."""
        budget, backoff = self.keys(route, destination)
        labels = {"route": route.name, "destination": destination}
        if self._waiting.get(budget, 0) >= max(1, self._max_concurrency() // 2):
            metrics.DESTINATION_THROTTLED.labels(**labels, reason="waiting").inc()
            yield f"too many deliveries wait for the budget of route {route.name}"
            return
        admission, factor = self._admit(route, budget, backoff)
        if admission.wait is None:
            metrics.DESTINATION_THROTTLED.labels(**labels, reason=admission.reason).inc()
            yield f"{admission.reason} of route {route.name} for {destination} reached"
            return
        if admission.wait > 0:
            metrics.DESTINATION_THROTTLED.labels(**labels, reason=admission.reason).inc()
            self._waiting[budget] = self._waiting.get(budget, 0) + 1
            try:
                await asyncio.sleep(admission.wait)
            finally:
                self._waiting[budget] -= 1
                if not self._waiting[budget]:
                    del self._waiting[budget]
        limit = connections
        if route.limits.connections:
            limit = min(limit, throttle.per_worker(route.limits.connections, self.workers))
        cap = throttle.connection_cap(limit, factor)
        if self._inflight.get(backoff, 0) < cap:
            self._inflight[backoff] = self._inflight.get(backoff, 0) + 1
        elif not await self._wait_for_connection(backoff, cap):
            metrics.DESTINATION_THROTTLED.labels(**labels, reason="connections").inc()
            yield f"connections of route {route.name} for {destination} in use"
            return
        try:
            yield None
        finally:
            self._release(backoff)

    async def _wait_for_connection(self, backoff: str, cap: int) -> bool:
        """Queue for a connection to `backoff`'s destination (first come, first served) for at
        most `max_wait` seconds; True once `_release` handed this delivery its connection.

        One waiter is woken per connection released (a condition variable woke every waiter
        of the process on every release: with a hundred deliveries queued behind ten
        connections that was a hundred task wake-ups per delivery)."""
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(self.max_wait, _expire, granted)
        self._queues.setdefault(backoff, collections.deque()).append((granted, cap))
        self._count_waiters(+1)
        try:
            return await granted
        except BaseException:
            if granted.done() and not granted.cancelled() and granted.result():
                self._release(backoff)  # handed a connection in the moment this task was cancelled
            raise
        finally:
            timer.cancel()
            self._count_waiters(-1)

    def _release(self, backoff: str) -> None:
        """Give a connection back: to the longest waiting delivery when its cap admits one
        more (strictly in arrival order), else to the pool."""
        inflight = self._inflight.get(backoff, 0) - 1
        queue = self._queues.get(backoff)
        if queue is not None:
            while queue:
                granted, cap = queue[0]
                if not granted.done():  # else it timed out or was cancelled
                    if inflight >= cap:
                        break
                    inflight += 1
                    granted.set_result(True)
                queue.popleft()
            if not queue:
                del self._queues[backoff]
        if inflight > 0:
            self._inflight[backoff] = inflight
        else:
            self._inflight.pop(backoff, None)

    def _count_waiters(self, change: int) -> None:
        self.connection_waiters += change
        if self.on_waiters is not None:
            self.on_waiters()

    def record(self, route: RouteConfig, destination: str, outcomes: Sequence[RecipientOutcome]) -> None:
        """Adapt to what the destination answered: slow down after a throttling reply, recover
        step by step after deliveries."""
        _budget, backoff = self.keys(route, destination)
        labels = {"route": route.name, "destination": destination}
        metrics.DESTINATION_ATTEMPTS.labels(**labels).inc()
        asked = [
            o
            for o in outcomes
            if o.disposition is Disposition.DEFERRED and throttle.is_throttle_reply(o.code, o.status, o.text)
        ]
        for o in outcomes:
            if o.disposition is Disposition.DEFERRED:
                reason = "throttled" if o in asked else _defer_reason(o.status)
                metrics.DESTINATION_DEFERRED.labels(**labels, reason=reason).inc()
        if asked:
            metrics.DESTINATION_THROTTLED.labels(**labels, reason="remote").inc()
            bucket = self._adapt(backoff, throttle.throttled)
            log.warning(
                "%s: %s asked to slow down (%d %s); rate factor %.3g, paused %.0fs",
                route.name,
                destination,
                asked[0].code,
                asked[0].status,
                bucket.factor,
                bucket.penalty,
            )
        elif any(o.disposition is Disposition.DELIVERED for o in outcomes):
            calm = self.table.peek(backoff)
            if calm.factor >= 1.0 and calm.penalty == 0.0:  # nothing to recover (throttle.succeeded)
                bucket = calm
            else:
                bucket = self._adapt(backoff, throttle.succeeded)
        else:
            return
        if self._factors.get(backoff) != bucket.factor:
            self._factors[backoff] = bucket.factor
            metrics.DESTINATION_FACTOR.labels(**labels).set(bucket.factor)


def _expire(granted: asyncio.Future[bool]) -> None:
    if not granted.done():
        granted.set_result(False)


def _defer_reason(status: str) -> str:
    if status.startswith("4.4."):
        return "connection"
    if status.startswith("4.7."):
        return "tls" if status in ("4.7.5", "4.7.10") else "policy"
    return "other"


class SenderCaps:
    """Per-sender abuse caps of the listeners (the front asks before it answers MAIL)."""

    def __init__(self, table: SharedTable | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table or SharedTable.from_environment()
        self._clock = clock

    def allow(self, listener: str, limits: SenderLimits, key: str) -> bool:
        now = self._clock()

        def count(buckets: list[Bucket]) -> tuple[list[Bucket], bool]:
            after, allowed = throttle.sender_cap(
                buckets[0], limits.messages_per_minute, limits.messages_per_hour, now
            )
            return [after], allowed

        return self.table.transact([f"sender|{listener}|{key}"], count)
