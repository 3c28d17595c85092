"""Scan cadence (Postfix's qmgr_scan): when the spool is listed, and what the listing queues.

incoming/ is listed at every scan, every few seconds (a safety net: fronts notify new mail at
once). deferred/, whose listing costs O(queue), only when something there may be due: at the
earliest due time the last listing saw, when this process's own deferrals come due, and every
`DEFERRED_SCAN_INTERVAL` for other workers' deferrals (measured: listing a 100,000-message
queue every 5 s made the per-message cost grow 1.33x from 10,000 to 100,000 queued). Due times
seen by a listing are remembered (ids and floats only: the queue itself stays on disk), so a
rescan stats only names it has not seen. Every scan also sets the queue-depth gauges.

The scheduler owns a `Scanner`, tells it about its own deferrals (`deferred_here`) and runs
`run` as a task; what to do with the ids is the `enqueue` callback's business (claiming is the
spool's, delivery the scheduler's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from relay import metrics
from relay.spool import Spool

log = logging.getLogger(__name__)

DEFERRED_SCAN_INTERVAL = 60.0  # list deferred/ at least this often (sooner when something is due)

Listing = tuple[list[str], float | None, dict[str, int]]  # due ids, next due time, depth by state


class Scanner:
    """Lists one spool for one scheduler; its clock is the scheduler's (epoch seconds)."""

    def __init__(self, spool: Spool, clock: Callable[[], float], interval: float) -> None:
        self._spool = spool
        self._clock = clock
        self._interval = interval
        self._known_due: dict[str, float] = {}
        self._deferred_scan_at = 0.0
        self._listed_next_due: float | None = None
        self._own_next_due: float | None = None

    def deferred_here(self, next_attempt: float) -> None:
        """This process deferred a message: list deferred/ again when it comes due."""
        if self._own_next_due is None or next_attempt < self._own_next_due:
            self._own_next_due = next_attempt

    def next_deferred_scan(self) -> float:
        """When deferred/ must be listed next (clock time)."""
        times = (self._deferred_scan_at, self._listed_next_due, self._own_next_due)
        return min(t for t in times if t is not None)

    def list_dirs(self, full: bool = True) -> Listing:
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

    def _listed(self, started: float, next_due: float | None, own_before: float | None) -> None:
        """Deferred/ was listed (the listing began at `started`)."""
        self._deferred_scan_at = started + DEFERRED_SCAN_INTERVAL
        self._listed_next_due = next_due
        if self._own_next_due == own_before:  # no deferral of ours since the listing began
            self._own_next_due = None

    def _queue(self, listing: Listing, enqueue: Callable[[str], object]) -> None:
        ids, _next_due, depth = listing
        for queue_id in ids:
            enqueue(queue_id)
        for state, count in depth.items():
            metrics.QUEUE_DEPTH.labels(state=state).set(count)

    def scan_now(self, enqueue: Callable[[str], object]) -> None:
        """List everything (incoming/ and deferred/) on the event loop: once, at start."""
        now = self._clock()
        listing = self.list_dirs()
        self._listed(now, listing[1], self._own_next_due)
        self._queue(listing, enqueue)

    async def rescan(self, enqueue: Callable[[str], object]) -> None:
        """List everything now (in a thread) and queue what is due."""
        ids, _next_due, _depth = await asyncio.to_thread(self.list_dirs)
        for queue_id in ids:
            enqueue(queue_id)

    async def run(
        self,
        enqueue: Callable[[str], object],
        wake: asyncio.Event,
        stopping: Callable[[], bool],
        after_scan: Callable[[], None],
    ) -> None:
        """Scan every `interval` seconds, sooner when deferred/ has something due or `wake` is
        set, until `stopping()`; `after_scan` runs after each scan (pool upkeep)."""
        while not stopping():
            try:
                now = self._clock()
                full = now >= self.next_deferred_scan()
                own_before = self._own_next_due
                listing = await asyncio.to_thread(self.list_dirs, full)
                if full:
                    self._listed(now, listing[1], own_before)
                self._queue(listing, enqueue)
                after_scan()
            except Exception:
                log.exception("spool scan failed")
            delay = min(self._interval, max(0.05, self.next_deferred_scan() - self._clock()))
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)
