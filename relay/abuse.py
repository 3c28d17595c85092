"""The abuse store: per-client-address counts that every worker process of a relay shares and
that survive a restart (failed AUTH, blocks, connections, messages, pregreet passes).

One small SQLite database, ``abuse.sqlite3`` in the queue directory (the pod's volume, like the
spool), in WAL mode with ``synchronous=NORMAL``: every change is one short ``BEGIN IMMEDIATE``
transaction (tens of microseconds, no fsync per change; a process crash loses nothing, a power
loss at most the last changes). SQLite's file locks serialise the workers; a busy database waits
at most `BUSY_MS`. Tables:

- ``live(pid, client, n)``: open connections per worker process; a worker's rows go when it
  dies (each process deletes the rows of pids that no longer exist when it opens the store,
  and the relay's first process clears the table at start: `reset_live`);
- ``counts(client, kind, start, n)``: fixed-window counters (``auth``, ``conn``, ``mail``);
- ``blocks(client, until)``; ``passed(client, until)``: pregreet passes.

What the counts mean is relay.core.abuse's. A store that fails (disk full, a broken file) fails
open: the front admits, logs at warning and counts ``mailrelay_abuse_store_errors_total``; a
file that is not a database is moved aside at open and a new one made; a directory where no
database can be made leaves each process counting on its own (in memory), logged as an error.

Called by relay.front and relay.front_session on the event loop (each call is short and
synchronous); by relay.app at start (`reset_live`). It never decides a reply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from relay import metrics
from relay.config import AbuseConfig, LimitsConfig
from relay.core import abuse as rules
from relay.core.abuse import Window
from relay.core.status import Reply

log = logging.getLogger(__name__)

FILE_NAME = "abuse.sqlite3"
BUSY_MS = 2000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS live (pid INTEGER, client TEXT, n INTEGER, PRIMARY KEY (pid, client));
CREATE TABLE IF NOT EXISTS counts (client TEXT, kind TEXT, start REAL, n INTEGER, PRIMARY KEY (client, kind));
CREATE TABLE IF NOT EXISTS blocks (client TEXT PRIMARY KEY, until REAL);
CREATE TABLE IF NOT EXISTS passed (client TEXT PRIMARY KEY, until REAL);
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AbuseStore:
    """The shared counts of one relay (all its workers), in `directory`/abuse.sqlite3."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(directory) / FILE_NAME
        self.clock = clock
        self.pid = os.getpid()
        self._db = self._open()
        self._closed = False
        with self._transaction() as db:
            for (pid,) in db.execute("SELECT DISTINCT pid FROM live").fetchall():
                if pid != self.pid and not _pid_alive(pid):
                    db.execute("DELETE FROM live WHERE pid = ?", (pid,))
            db.execute("DELETE FROM live WHERE pid = ?", (self.pid,))

    def _open(self) -> sqlite3.Connection:
        try:
            return self._open_file()
        except (sqlite3.Error, OSError) as exc:
            metrics.ABUSE_STORE_ERRORS.inc()
            log.error("abuse store %s cannot be used (%s): counting in this process only", self.path, exc)
            db = sqlite3.connect(":memory:", isolation_level=None)
            db.executescript(_SCHEMA)
            return db

    def _open_file(self) -> sqlite3.Connection:
        for attempt in (1, 2):
            try:
                db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_MS / 1000)
                db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.executescript(_SCHEMA)
                return db
            except sqlite3.DatabaseError as exc:
                if attempt == 2 or (isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)):
                    raise
                aside = self.path.with_name(f"{FILE_NAME}.broken-{int(time.time())}")
                log.error(
                    "abuse store %s unreadable (%s): moved to %s, starting empty", self.path, exc, aside
                )
                with contextlib.suppress(OSError):
                    os.replace(self.path, aside)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Forget this process's live connections and close; later calls are no-ops that admit."""
        if self._closed:
            return
        with contextlib.suppress(sqlite3.Error), self._transaction() as db:
            db.execute("DELETE FROM live WHERE pid = ?", (self.pid,))
        self._closed = True
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise sqlite3.ProgrammingError("the abuse store is closed")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        if self._closed:  # sessions that end after the front closed
            return
        metrics.ABUSE_STORE_ERRORS.inc()
        log.warning("abuse store %s: %s failed, admitting: %s", self.path, what, exc)

    # ------------------------------------------------------------------ helpers inside a transaction

    @staticmethod
    def _bump(db: sqlite3.Connection, client: str, kind: str, now: float, length: float) -> Window:
        row = db.execute(
            "SELECT start, n FROM counts WHERE client = ? AND kind = ?", (client, kind)
        ).fetchone()
        window = rules.advance(Window(row[0], row[1]) if row else None, now, length)
        db.execute(
            "INSERT INTO counts (client, kind, start, n) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (client, kind) DO UPDATE SET start = excluded.start, n = excluded.n",
            (client, kind, window.start, window.count),
        )
        return window

    @staticmethod
    def _blocked_until(db: sqlite3.Connection, client: str) -> float | None:
        row = db.execute("SELECT until FROM blocks WHERE client = ?", (client,)).fetchone()
        return float(row[0]) if row else None

    # ------------------------------------------------------------------ what the front asks

    def reset_live(self) -> None:
        """At relay start, before any worker serves: no connection is open."""
        with self._transaction() as db:
            db.execute("DELETE FROM live")

    def connect(
        self, client: str, *, trusted: bool, limits: LimitsConfig, abuse: AbuseConfig
    ) -> tuple[Reply, str] | None:
        """Count a new connection of `client` (released by `disconnect`, refused or not); the
        refusal (reply, reason) if it may not go on."""
        now = self.clock()
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO live (pid, client, n) VALUES (?, ?, 1) "
                    "ON CONFLICT (pid, client) DO UPDATE SET n = n + 1",
                    (self.pid, client),
                )
                (live,) = db.execute("SELECT SUM(n) FROM live WHERE client = ?", (client,)).fetchone()
                recent = None
                if abuse.connections and not trusted:
                    recent = self._bump(db, client, "conn", now, abuse.window)
                blocked = self._blocked_until(db, client)
        except sqlite3.Error as exc:
            self._failed("connect", exc)
            return None
        return rules.connection_refusal(
            blocked_until=blocked,
            live=int(live or 0),
            recent=recent,
            trusted=trusted,
            now=now,
            limits=limits,
            abuse=abuse,
        )

    def disconnect(self, client: str) -> None:
        try:
            with self._transaction() as db:
                db.execute("UPDATE live SET n = n - 1 WHERE pid = ? AND client = ?", (self.pid, client))
                db.execute("DELETE FROM live WHERE pid = ? AND client = ? AND n <= 0", (self.pid, client))
        except sqlite3.Error as exc:
            self._failed("disconnect", exc)

    def live(self, client: str) -> int:
        """Open connections of `client` over all workers."""
        (count,) = self._db.execute("SELECT SUM(n) FROM live WHERE client = ?", (client,)).fetchone()
        return int(count or 0)

    def blocked(self, client: str) -> bool:
        if self._closed:
            return False
        try:
            return rules.is_blocked(self._blocked_until(self._db, client), self.clock())
        except sqlite3.Error as exc:
            self._failed("blocked", exc)
            return False

    def auth_failed(self, client: str, abuse: AbuseConfig) -> bool:
        """Count a failed AUTH; True when the address is (now) blocked."""
        now = self.clock()
        try:
            with self._transaction() as db:
                failures = self._bump(db, client, "auth", now, abuse.window)
                until = rules.block_after_failure(failures, now, abuse)
                if until is not None:
                    db.execute(
                        "INSERT INTO blocks (client, until) VALUES (?, ?) "
                        "ON CONFLICT (client) DO UPDATE SET until = excluded.until",
                        (client, until),
                    )
                    db.execute("DELETE FROM counts WHERE client = ? AND kind = 'auth'", (client,))
                blocked = until is not None or rules.is_blocked(self._blocked_until(db, client), now)
        except sqlite3.Error as exc:
            self._failed("auth_failed", exc)
            return False
        if until is not None:
            metrics.ABUSE_BLOCKS.labels("auth_failures").inc()
            log.warning(
                "client %s blocked for %.0fs after %d failed AUTH attempts",
                client,
                abuse.block_for,
                failures.count,
            )
        return blocked

    def message(self, client: str, *, trusted: bool, abuse: AbuseConfig) -> tuple[Reply, str] | None:
        """Count a MAIL command; the refusal if the address sent too much in the window."""
        if not abuse.messages or trusted:
            return None
        try:
            with self._transaction() as db:
                recent = self._bump(db, client, "mail", self.clock(), abuse.window)
        except sqlite3.Error as exc:
            self._failed("message", exc)
            return None
        return rules.message_refusal(recent=recent, trusted=trusted, abuse=abuse)

    def pregreet_passed(self, client: str) -> bool:
        if self._closed:
            return True
        try:
            row = self._db.execute("SELECT until FROM passed WHERE client = ?", (client,)).fetchone()
        except sqlite3.Error as exc:
            self._failed("pregreet_passed", exc)
            return True
        return bool(row) and self.clock() < float(row[0])

    def pregreet_pass(self, client: str, abuse: AbuseConfig) -> None:
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO passed (client, until) VALUES (?, ?) "
                    "ON CONFLICT (client) DO UPDATE SET until = excluded.until",
                    (client, self.clock() + abuse.pregreet_pass_for),
                )
        except sqlite3.Error as exc:
            self._failed("pregreet_pass", exc)

    def expire(self, abuse: AbuseConfig) -> None:
        """Drop blocks, passes and counters that no longer mean anything (called now and then)."""
        now = self.clock()
        try:
            with self._transaction() as db:
                db.execute("DELETE FROM blocks WHERE until <= ?", (now,))
                db.execute("DELETE FROM passed WHERE until <= ?", (now,))
                db.execute("DELETE FROM counts WHERE start < ?", (now - abuse.window,))
        except sqlite3.Error as exc:
            self._failed("expire", exc)
