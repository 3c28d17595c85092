"""Dispatch and flow control (Postfix's qmgr active-queue limits and ``in_flow_delay``).

Queue ids come in from the fronts (`notify`: a new message was stored) and from spool scans
(`enqueue`); each id is queued once, however often it is seen, and never while it is in
flight. The dispatch loop starts one delivery task per id, at most ``queue.maxConcurrency`` at
a time per process (the limit in force at start).

Intake flow control: `room_for_intake` holds the front's 250, for at most `IN_FLOW_DELAY`
seconds per message, while the messages waiting to be sent number ``queue.maxPerDestination``
(or ``queue.maxConcurrency``, when that is smaller) or more: those notified and not yet
dispatched, and those dispatched and waiting for a connection (relay.throttle's
`connection_waiters`: one destination's connections are all in use). The message is already
durable; the clients are only slowed to the rate the relay delivers at, so new mail waits
milliseconds, not seconds, behind a backlog. Measured (bench, 2 KB x 20 sessions): when only
undispatched mail counted, and only from ``maxConcurrency`` (100) on, a backlog of 200-400
messages stood behind the connections (p50 268 ms, p99 466 ms against Postfix's 21 and 137);
at 50 sessions with no gate at all the median was 3.9 s. A backlog of deferred mail coming due
does not count: only mail stored since the last dispatch, and deliveries waiting for a
connection.

What a delivery does is the `deliver` callback's (relay.scheduler); this module only sequences.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from relay import metrics

log = logging.getLogger(__name__)

IN_FLOW_DELAY = 1.0  # seconds the front may hold one 250 while new mail piles up (Postfix's default)


class Dispatcher:
    """Runs `deliver(queue_id)` for queued ids, a bounded number at a time."""

    def __init__(
        self,
        deliver: Callable[[str], Coroutine[Any, Any, None]],
        max_concurrency: Callable[[], int],
        *,
        intake_room: Callable[[], int],
        waiting: Callable[[], int],
    ) -> None:
        self._deliver = deliver
        self._max_concurrency = max_concurrency  # the current setting (reloads change it)
        self._intake_room = intake_room  # messages waiting that shut the gate
        self._waiting = waiting  # dispatched deliveries waiting for a connection
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._fresh: set[str] = set()  # notified by a front, not yet dispatched
        self._room = asyncio.Event()  # set while len(_fresh) leaves room for intake
        self._room.set()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._idle: asyncio.Event | None = None  # set: nothing queued, nothing in flight
        self.stopping = False

    def start(self) -> None:
        self._slots = asyncio.Semaphore(self._max_concurrency())
        self._idle = asyncio.Event()
        self._update_idle()

    # ----------------------------------------------------------------- ids in

    def enqueue(self, queue_id: str) -> bool:
        """Queue `queue_id` for delivery unless it is queued or in flight already."""
        if self.stopping or queue_id in self._queued or queue_id in self._inflight:
            return False
        self._queued.add(queue_id)
        self._ready.put_nowait(queue_id)
        self._update_idle()
        return True

    def notify(self, queue_id: str) -> None:
        """A front stored `queue_id`: queue it, and count it against the intake room."""
        if self.enqueue(queue_id):
            self._fresh.add(queue_id)
            self.check_room()

    def check_room(self) -> None:
        """Open or shut the intake gate for the messages waiting now (relay.throttle calls it
        when a delivery starts or stops waiting for a connection)."""
        if not self.stopping and len(self._fresh) + self._waiting() >= self._intake_room():
            self._room.clear()
        else:
            self._room.set()

    async def room_for_intake(self, timeout: float = IN_FLOW_DELAY) -> bool:  # noqa: ASYNC109
        """Return once fewer messages wait to be sent than the gate allows (see the module
        docstring), or after `timeout` seconds; False when it timed out (the caller answers anyway)."""
        if self._room.is_set():
            return True
        metrics.INTAKE_DELAYED.inc()
        try:
            await asyncio.wait_for(self._room.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ----------------------------------------------------------------- dispatch

    async def run(self) -> None:
        """The dispatch loop (a task until `stop`)."""
        assert self._slots is not None, "start() first"
        while not self.stopping:
            queue_id = await self._ready.get()
            await self._slots.acquire()
            self._queued.discard(queue_id)
            self._fresh.discard(queue_id)
            self.check_room()
            if self.stopping:
                self._slots.release()
                break
            task = asyncio.create_task(self._deliver(queue_id), name=f"deliver-{queue_id}")
            self._inflight[queue_id] = task
            task.add_done_callback(functools.partial(self._finished, queue_id))

    def _finished(self, queue_id: str, _task: asyncio.Task[None] | None = None) -> None:
        self._inflight.pop(queue_id, None)
        if self._slots is not None:
            self._slots.release()
        self._update_idle()

    def _update_idle(self) -> None:
        if self._idle is None:
            return
        if self._queued or self._inflight:
            self._idle.clear()
        else:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing is queued and nothing is in flight (at once before `start`)."""
        if self._idle is None:
            return
        while not self._idle.is_set():
            await self._idle.wait()

    # ----------------------------------------------------------------- stop

    def stop(self) -> None:
        """Queue nothing more; fronts still finishing transactions must not wait for room."""
        self.stopping = True
        self._room.set()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 (the shell passes its grace period)
        """Let in-flight deliveries finish within `timeout`; cancel the rest."""
        inflight = list(self._inflight.values())
        if not inflight:
            return
        _done, pending = await asyncio.wait(inflight, timeout=max(timeout, 0.0))
        for task in pending:
            task.cancel()
        if pending:
            log.warning("stop: %d deliveries cancelled at the deadline", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)
