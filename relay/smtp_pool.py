"""The connection pool of next-hop delivery: idle SMTP sessions kept per destination, reused.

`relay.delivery.SmtpClient` keeps one `ConnectionPool`, keyed by its `SmtpTarget` (host, port,
TLS settings, credentials: a session is only reused for exactly the destination it was opened
for). Per key the pool holds

- a semaphore of ``queue.maxPerDestination`` slots: at most that many transactions (and so
  connections) to one destination at a time; a reload's new limit applies to keys first seen
  after it, existing ones keep theirs until the process restarts;
- the idle sessions, most recently used last. `take` hands out the newest one: if it finished a
  transaction less than `PROBE_AFTER_IDLE` seconds ago it is reused as it is (the server waits
  for MAIL, RFC 5321 4.1.4; a session the server closed was already noticed by the event loop),
  one idle for longer is probed with RSET first; one idle for more than `IDLE_SECONDS` or no
  longer connected is closed. `prune` (the scheduler's periodic scan) closes those too.

Opening sessions, and what a transaction does on them, is relay.delivery's; this module only
keeps, hands out and closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from relay.smtp_client import SmtpConnection, SmtpError

IDLE_SECONDS = 30.0  # keep an idle pooled connection this long (servers drop idle ones after minutes)
PROBE_AFTER_IDLE = 2.0  # RSET a pooled connection before reuse only after this long idle


@dataclass
class PooledConnection:
    """One SMTP session and its pool bookkeeping."""

    smtp: SmtpConnection
    idle_since: float = 0.0
    used: int = 0  # transactions it finished (0: opened for the transaction now running)

    def supports(self, extension: str) -> bool:
        return self.smtp.supports(extension)


@dataclass
class Destination:
    """The slots and the idle sessions of one destination."""

    limit: asyncio.Semaphore
    idle: list[PooledConnection] = field(default_factory=list)


class ConnectionPool:
    """Idle sessions and transaction slots per destination key."""

    def __init__(self, per_destination: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_destination = per_destination
        self._clock = clock
        self._destinations: dict[Hashable, Destination] = {}
        self._closed = False

    def destination(self, key: Hashable) -> Destination:
        found = self._destinations.get(key)
        if found is None:
            found = self._destinations[key] = Destination(asyncio.Semaphore(self.per_destination))
        return found

    def slots(self, key: Hashable) -> asyncio.Semaphore:
        """Hold one for the whole transaction to `key`."""
        return self.destination(key).limit

    def _stale(self, connection: PooledConnection, now: float) -> bool:
        return now - connection.idle_since > IDLE_SECONDS or not connection.smtp.is_connected

    async def take(self, key: Hashable, rset_timeout: float) -> PooledConnection | None:
        """An idle session to `key` that is fit for a new transaction, or None (open one)."""
        idle = self.destination(key).idle
        now = self._clock()
        while idle:
            connection = idle.pop()
            if self._stale(connection, now):
                connection.smtp.close()
                continue
            if now - connection.idle_since < PROBE_AFTER_IDLE:
                return connection  # busy and known good: no RSET round trip
            try:
                reply = await connection.smtp.rset(rset_timeout)
            except SmtpError:
                connection.smtp.close()
                continue
            if reply.code == 250:
                return connection
            connection.smtp.close()
        return None

    def give_back(self, key: Hashable, connection: PooledConnection, reusable: bool) -> None:
        """A transaction ended: keep the session for the next one, or close it."""
        if reusable and connection.smtp.is_connected and not self._closed:
            connection.idle_since = self._clock()
            connection.used += 1
            self.destination(key).idle.append(connection)
        else:
            connection.smtp.close()

    def prune(self) -> None:
        """Close idle sessions older than `IDLE_SECONDS` or no longer connected."""
        now = self._clock()
        for destination in self._destinations.values():
            keep = []
            for connection in destination.idle:
                if self._stale(connection, now):
                    connection.smtp.close()
                else:
                    keep.append(connection)
            destination.idle = keep

    def idle_connections(self) -> int:
        return sum(len(d.idle) for d in self._destinations.values())

    async def close(self) -> None:
        """QUIT every idle session; sessions given back later are closed, not kept."""
        self._closed = True
        idle = [c for d in self._destinations.values() for c in d.idle]
        for destination in self._destinations.values():
            destination.idle = []

        async def quit_one(connection: PooledConnection) -> None:
            with contextlib.suppress(SmtpError):
                await connection.smtp.quit(5)
            connection.smtp.close()

        await asyncio.gather(*(quit_one(c) for c in idle))
