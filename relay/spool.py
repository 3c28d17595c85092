"""The durable message queue on disk: Postfix's queue directories, one file per message.

Layout under the queue directory::

    tmp/        partial writes; discarded by recovery
    incoming/   accepted and durable, waiting to be claimed
    active/     claimed by a scheduler (rename is the atomic claim between worker processes)
    deferred/   waiting for a retry; the file's mtime is the next attempt time
    hold/       held by an operator (`mailrelay queue hold`)
    corrupt/    quarantined: unreadable files, never deleted automatically

A queue file is ``MRQ1 <json QueueEntry>\\n`` followed by the message content. The two are
written with one writev and read back apart (header, then the content into a bytes of its
own), so a message's body is never copied to join or split it.

`store` returns only once the message is durable, the rule that lets the front answer 250: the
file is written in tmp/, renamed into incoming/ and then fsync()ed, one fsync per message, as
Postfix's cleanup does. That one fsync also makes the new name durable on the file systems a
spool volume uses (ext4, XFS and btrfs log the rename with the inode it changes, and fsync
commits the log up to the inode's last change; NFS commits directory changes before it
replies), so no directory fsync follows (measured: the second fsync cost a third of the
single-session rate). A power loss in the window between the rename and the fsync can leave an
empty or truncated file in incoming/; the client had no 250 for it, and the scheduler moves it
to corrupt/ when it fails to parse. The write-fsync-rename sequence itself is relay.durable's;
the order of its fsyncs is decided here.

A deferral rewrites the claimed file (tmp, fsync, rename over ``active/ID``), renames it into
``deferred/`` and fsyncs again: the message is never in two claimable places at once (two
workers sharing the spool cannot both own it), and a crash at any point leaves one complete
copy; recovery removes stale duplicates.

Blocking calls run in a thread pool, never on the event loop; concurrent fsyncs share journal
commits in the file system (group commit). Short metadata operations (claims, removals) that
queue up while one batch runs go together as the next batch, one thread hop for many messages
under load. The spool decides nothing about delivery; the scheduler does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relay import durable
from relay.core.model import Message, QueueEntry

log = logging.getLogger(__name__)
T = TypeVar("T")

MAGIC = b"MRQ1 "
STATES = ("incoming", "active", "deferred", "hold", "corrupt")
_ALL_DIRS = ("tmp", *STATES)


class SpoolError(Exception):
    """The spool cannot store or change a message; the cause is chained (an OSError)."""


class SpoolFullError(SpoolError):
    """No space left (ENOSPC/EDQUOT): the front answers 452 4.3.1."""


class SpoolReadOnlyError(SpoolError):
    """The file system is read-only or not writable (EROFS/EACCES): the front answers 451 4.3.0."""


class CorruptEntryError(SpoolError):
    """A queue file that cannot be parsed; it has been moved to corrupt/."""


@dataclass(frozen=True)
class RecoveryReport:
    """What `Spool.recover` did on start."""

    requeued: int  # active -> incoming
    discarded_partial: int  # tmp files removed
    quarantined: int  # unreadable files moved to corrupt/
    duplicates_removed: int  # stale copies left by a crash between rename and unlink


_ids = random.Random(secrets.randbits(64))  # unique, not secret: no system call per id


def new_queue_id() -> str:
    """A sortable, unique queue id: microsecond time plus randomness, e.g. ``18B3F2A9C1D04E7A3F``."""
    return f"{time.time_ns() // 1000:013X}{_ids.getrandbits(24):06X}"


def queue_id_time(queue_id: str) -> float | None:
    """When a queue id was made (epoch seconds), from its first 13 hex digits; None for an id
    of another form. A handed-off message keeps its id, so this is its first acceptance."""
    head = queue_id[:13]
    if len(queue_id) != 19 or not all(c in "0123456789ABCDEF" for c in head):
        return None
    return int(head, 16) / 1_000_000


@dataclass(frozen=True)
class QueueSnapshot:
    """Messages per state directory and the first acceptance of the oldest one."""

    counts: dict[str, int]
    oldest: float | None  # epoch seconds, None when the spool holds no message

    @property
    def depth(self) -> int:
        """Every message the spool holds (corrupt ones too: a spool is empty only without them)."""
        return sum(self.counts.values())


def _classify(exc: OSError) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(f"spool full: {exc.strerror}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return SpoolReadOnlyError(f"spool not writable: {exc.strerror}")
    return SpoolError(f"spool I/O error: {exc.strerror or exc}")


def encode(entry: QueueEntry, content: bytes) -> bytes:
    return b"".join(encode_parts(entry, content))


def encode_parts(entry: QueueEntry, content: bytes) -> tuple[bytes, bytes]:
    """The queue file as (header line, content): written with one writev, never joined."""
    header = json.dumps(entry.to_json(), separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return MAGIC + header + b"\n", content


def decode(data: bytes) -> Message:
    newline = data.find(b"\n")
    if newline < 0:
        raise ValueError(
            "not a mailrelay queue file" if not data.startswith(MAGIC) else "truncated queue file header"
        )
    return decode_parts(data[: newline + 1], data[newline + 1 :])


def decode_parts(head: bytes, content: bytes) -> Message:
    """A queue file read as its header line (newline included) and the content after it."""
    if not head.startswith(MAGIC):
        raise ValueError("not a mailrelay queue file")
    if not head.endswith(b"\n"):
        raise ValueError("truncated queue file header")
    entry = QueueEntry.from_json(json.loads(head[len(MAGIC) : -1]))
    if entry.size and len(content) != entry.size:
        raise ValueError(f"truncated queue file: {len(content)} of {entry.size} bytes")
    return Message(entry=entry, content=content)


def read_header(path: Path) -> QueueEntry:
    """Only the header of a queue file (cheap for `queue list`)."""
    with path.open("rb") as handle:
        line = handle.readline(1 << 20)
    if not line.startswith(MAGIC) or not line.endswith(b"\n"):
        raise ValueError("not a mailrelay queue file")
    return QueueEntry.from_json(json.loads(line[len(MAGIC) :]))


_HEAD_READ = 4096  # bytes read first from a queue file: its header line, mostly


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes from `offset` (fewer only at the end of the file)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _Batcher:
    """Runs short metadata operations (claim renames and reads, unlinks) queued while the
    previous batch ran as one job in the pool: one thread hop for many messages under load."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._running = False

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((func, args, future))
        if not self._running:
            self._start()
        return await future

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        self._running = True
        job = asyncio.get_running_loop().run_in_executor(self._executor, _run_batch, batch)
        job.add_done_callback(lambda done: self._finished(batch, done))

    def _finished(self, batch: list[tuple[Any, Any, asyncio.Future[Any]]], done: asyncio.Future[Any]) -> None:
        self._running = False
        outcomes: list[tuple[bool, Any]]
        if done.cancelled() or done.exception() is not None:
            error = done.exception() if not done.cancelled() else asyncio.CancelledError()
            outcomes = [(False, error)] * len(batch)
        else:
            outcomes = done.result()
        for (_func, _args, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        if self._pending:
            self._start()


def _run_batch(batch: list[tuple[Callable[..., Any], tuple[Any, ...], Any]]) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    for func, args, _future in batch:
        try:
            outcomes.append((True, func(*args)))
        except Exception as exc:
            outcomes.append((False, exc))
    return outcomes


class Spool:
    """One relay's queue directory. Safe to share between worker processes of one relay."""

    def __init__(self, directory: Path, *, fsync: bool = True, threads: int = 8) -> None:
        self.directory = Path(directory)
        self._root = str(self.directory)  # the hot path joins strings, not Path objects
        self._tmp_names = itertools.count()
        self.fsync = fsync
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool")
        self._batcher = _Batcher(self._executor)

    # ----------------------------------------------------------------- setup

    def prepare(self) -> None:
        """Create the directories (idempotent)."""
        for name in _ALL_DIRS:
            (self.directory / name).mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def path(self, state: str, queue_id: str) -> Path:
        return Path(self._file(state, queue_id))

    def _file(self, state: str, queue_id: str) -> str:
        if state not in STATES or not queue_id.isalnum():
            raise ValueError(f"bad queue reference {state}/{queue_id}")
        return f"{self._root}/{state}/{queue_id}"

    def recover(self) -> RecoveryReport:
        """Run once on start, before any scheduler: make the on-disk state consistent again."""
        self.prepare()
        discarded = 0
        for leftover in (self.directory / "tmp").iterdir():
            leftover.unlink(missing_ok=True)
            discarded += 1
        duplicates = 0
        requeued = 0
        quarantined = 0
        held = set(os.listdir(self.directory / "hold"))
        deferred = os.listdir(self.directory / "deferred")
        settled = held.union(deferred)
        for path in list((self.directory / "active").iterdir()):
            if path.name in settled or (self.directory / "incoming" / path.name).exists():
                path.unlink(missing_ok=True)
                duplicates += 1
                continue
            try:
                read_header(path)
            except (OSError, ValueError, KeyError):
                os.replace(path, self.directory / "corrupt" / path.name)
                quarantined += 1
                continue
            os.replace(path, self.directory / "incoming" / path.name)
            requeued += 1
        for name in held.intersection(deferred):  # names only: no stat per queued message
            (self.directory / "deferred" / name).unlink(missing_ok=True)
            duplicates += 1
        for state in STATES:
            self._fsync_dir_now(self.directory / state)
        report = RecoveryReport(requeued, discarded, quarantined, duplicates)
        if requeued or discarded or quarantined or duplicates:
            log.info("spool recovered: %s", report)
        return report

    def _fsync_dir_now(self, path: Path) -> None:
        if self.fsync:
            durable.fsync_dir(path)

    # ----------------------------------------------------------------- blocking primitives

    def _commit(
        self,
        entry: QueueEntry,
        content: bytes,
        moves: tuple[str, ...],
        mtime: float | None,
        *,
        replaces_durable_copy: bool = False,
    ) -> None:
        """Write a new queue file in tmp/, rename it through `moves` (the last is where it
        stays), then fsync it: that fsync makes the content and the names durable (see the
        module docstring). When the first move replaces a durable copy, the content is
        fsynced before it, so a crash never leaves a truncated file in its place. Raises
        SpoolError; a failure before the first rename removes the temporary file, a later one
        leaves the renamed file to the caller."""
        tmp = f"{self._root}/tmp/{entry.queue_id}.{os.getpid()}.{next(self._tmp_names)}"
        try:
            durable.commit(
                tmp,
                encode_parts(entry, content),
                moves,
                fsync_before_rename=self.fsync and replaces_durable_copy,
                fsync_after_rename=self.fsync,
                mtime=mtime,
            )
        except OSError as exc:
            raise _classify(exc) from exc

    def _read(self, path: str) -> Message:
        fd = os.open(path, os.O_RDONLY)
        try:
            # The header line, then the content read into a bytes of its own (not sliced out
            # of a copy of the whole file: a 100 KB memcpy less per delivery).
            size = os.fstat(fd).st_size
            head = _pread_all(fd, min(size, _HEAD_READ), 0)
            newline = head.find(b"\n")
            if newline < 0 and len(head) < size:  # a header longer than _HEAD_READ
                head = _pread_all(fd, size, 0)
                newline = head.find(b"\n")
            if newline >= 0:
                content = (
                    head[newline + 1 :]
                    if len(head) == size
                    else _pread_all(fd, size - newline - 1, newline + 1)
                )
                head = head[: newline + 1]
            else:
                content = b""
        finally:
            os.close(fd)
        try:
            return decode_parts(head, content)
        except (ValueError, KeyError, TypeError) as exc:
            name = os.path.basename(path)
            with contextlib.suppress(OSError):
                os.replace(path, f"{self._root}/corrupt/{name}")
            raise CorruptEntryError(f"queue file {name} is unreadable ({exc}); moved to corrupt/") from exc

    def _claim(self, queue_id: str, sources: tuple[str, ...], due_by: float | None) -> Message | None:
        target = self._file("active", queue_id)
        for state in sources:
            source = self._file(state, queue_id)
            try:
                os.rename(source, target)
            except FileNotFoundError:
                continue
            if state == "deferred" and due_by is not None:
                # Checked after the rename, on the file we now own: another worker may have
                # deferred it again (new mtime) since the caller saw it. Not due: put it back.
                try:
                    due = os.stat(target).st_mtime
                except FileNotFoundError:
                    return None
                if due > due_by:
                    os.rename(target, source)
                    return None
            return self._read(target)
        return None

    def _defer(self, entry: QueueEntry, content: bytes) -> None:
        """Rewrite the claimed file in place, then move it: the message is never in two places
        at once, so no other worker can claim a copy that this one then removes."""
        moves = (self._file("active", entry.queue_id), self._file("deferred", entry.queue_id))
        self._commit(entry, content, moves, entry.next_attempt, replaces_durable_copy=True)

    # ----------------------------------------------------------------- async API for the hot path

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def store(self, entry: QueueEntry, content: bytes) -> None:
        """Make a new message durable in incoming/. Returns only once it is on disk."""
        if entry.size != len(content):  # the front's entries already say (one object less)
            entry = entry.with_changes(size=len(content))
        await self._run(self._store, entry, content)

    def _store(self, entry: QueueEntry, content: bytes) -> None:
        target = self._file("incoming", entry.queue_id)
        try:
            self._commit(entry, content, (target,), None)
        except SpoolError:
            with contextlib.suppress(OSError):
                os.unlink(target)  # the client is told 4xx: a copy that may not be durable must not go out
            raise

    async def claim(self, queue_id: str, *, due_by: float | None = None) -> Message | None:
        """Move a message from incoming/ or deferred/ to active/ and read it; None if another
        process claimed it first or it is gone. With `due_by` (epoch seconds), a deferred
        message whose next attempt is later stays deferred (None): the caller may have seen
        the id in incoming/ before another worker attempted and deferred it.
        Raises CorruptEntryError for unreadable files."""
        return await self._batcher.run(self._claim, queue_id, ("incoming", "deferred"), due_by)

    async def claim_deferred(self, queue_id: str) -> Message | None:
        """Claim a deferred message whatever its next attempt (a draining relay hands it off);
        None if a scheduler claimed it first or it is gone."""
        return await self._batcher.run(self._claim, queue_id, ("deferred",), None)

    async def read_held(self, queue_id: str) -> Message | None:
        """A held message, read where it is (hold/ is never claimed); None when it is gone."""
        try:
            return await self._run(self._read, self._file("hold", queue_id))
        except FileNotFoundError:
            return None

    async def remove(self, state: str, queue_id: str) -> None:
        """Remove a message from `state` (a hand-off that the peer answered 250)."""
        await self._batcher.run(self._unlink, state, queue_id)

    async def adopt(self, entry: QueueEntry, content: bytes, *, now: float) -> str | None:
        """Store a message handed off by a peer with its queue state: held ones in hold/, ones
        whose next attempt is later in deferred/ (mtime = next attempt), the rest in incoming/.
        Returns the state it went to, or None when a message with this queue id is already here
        (a repeated hand-off: kept once). Returns only once the message is durable."""
        return await self._run(self._adopt, entry.with_changes(size=len(content)), content, now)

    def _adopt(self, entry: QueueEntry, content: bytes, now: float) -> str | None:
        if self.locate(entry.queue_id) is not None:
            return None
        if entry.held:
            state, mtime = "hold", None
        elif entry.next_attempt > now:
            state, mtime = "deferred", entry.next_attempt
        else:
            state, mtime = "incoming", None
        target = self._file(state, entry.queue_id)
        try:
            self._commit(entry, content, (target,), mtime)
        except SpoolError:
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise
        return state

    def snapshot(self) -> QueueSnapshot:
        """Counts per state and the oldest message's first acceptance, from directory entries
        (a queue id carries its creation time; the file's header is read only for other ids)."""
        counts: dict[str, int] = {}
        oldest: float | None = None
        for state in STATES:
            try:
                names = os.listdir(self.directory / state)
            except FileNotFoundError:
                names = []
            counts[state] = len(names)
            for name in names:
                when = queue_id_time(name)
                if when is None:
                    try:
                        when = read_header(self.directory / state / name).arrival
                    except (OSError, ValueError, KeyError):
                        continue
                if oldest is None or when < oldest:
                    oldest = when
        return QueueSnapshot(counts, oldest)

    async def defer(self, entry: QueueEntry, content: bytes) -> None:
        """Rewrite a claimed message (mtime = next attempt) and move it from active/ to
        deferred/. Returns once the move is on disk."""
        await self._run(self._defer, entry, content)

    async def complete(self, queue_id: str) -> None:
        """Every recipient has a final outcome (and any DSN is queued): remove the message."""
        await self._batcher.run(self._unlink, "active", queue_id)

    async def requeue_unchanged(self, queue_id: str, next_attempt: float) -> None:
        """Move a claimed message from active/ back to deferred/ as it is, due at
        `next_attempt`: a rename and an mtime need no free space, so this still works on a
        full spool that cannot take the rewritten file `defer` writes. Raises SpoolError."""
        await self._run(self._requeue_unchanged, queue_id, next_attempt)

    def _requeue_unchanged(self, queue_id: str, next_attempt: float) -> None:
        active = self._file("active", queue_id)
        try:
            os.utime(active, (next_attempt, next_attempt))
            os.rename(active, self._file("deferred", queue_id))
        except OSError as exc:
            raise _classify(exc) from exc

    def _unlink(self, state: str, queue_id: str) -> None:
        try:
            os.unlink(self._file(state, queue_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _classify(exc) from exc

    # ----------------------------------------------------------------- inspection and admin (sync)

    def ids(self, state: str) -> list[str]:
        try:
            return sorted(p.name for p in (self.directory / state).iterdir())
        except FileNotFoundError:
            return []

    def depth(self) -> dict[str, int]:
        counts = {}
        for state in STATES:
            try:
                with os.scandir(self.directory / state) as entries:
                    counts[state] = sum(1 for _ in entries)
            except FileNotFoundError:
                counts[state] = 0
        return counts

    def scan_deferred(self, known: Mapping[str, float] | None = None) -> Iterator[tuple[str, float]]:
        """(queue id, next attempt) for every deferred message, from directory entries only.

        `known` maps ids to next-attempt times remembered from an earlier scan: those entries
        are not stat()ed again (a rescan of 100,000 deferred messages then costs a directory
        listing, not 100,000 system calls). A remembered time can only be too early (a deferral
        moves it later), which `claim(due_by=...)` catches."""
        try:
            with os.scandir(self.directory / "deferred") as entries:
                for item in entries:
                    if known is not None:
                        due = known.get(item.name)
                        if due is not None:
                            yield item.name, due
                            continue
                    try:
                        yield item.name, item.stat().st_mtime
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return

    def locate(self, queue_id: str) -> tuple[str, Path] | None:
        for state in STATES:
            path = self.path(state, queue_id)
            if path.exists():
                return state, path
        return None

    def read(self, queue_id: str) -> tuple[str, Message] | None:
        found = self.locate(queue_id)
        if found is None:
            return None
        state, path = found
        return state, decode(path.read_bytes())

    def entries(self, state: str) -> Iterator[QueueEntry]:
        for queue_id in self.ids(state):
            with contextlib.suppress(OSError, ValueError, KeyError):
                yield read_header(self.path(state, queue_id))

    def retry_now(self, queue_id: str) -> bool:
        """Make a deferred or held message due now (moves it to incoming/)."""
        return self._admin_move(queue_id, ("deferred", "hold"), "incoming")

    def release(self, queue_id: str) -> bool:
        """Undo `hold`: a held message goes back to incoming/ (due now); nothing else moves."""
        return self._admin_move(queue_id, ("hold",), "incoming")

    def hold(self, queue_id: str) -> bool:
        """Park a waiting message in hold/ so no scheduler picks it up."""
        return self._admin_move(queue_id, ("incoming", "deferred"), "hold")

    def delete(self, queue_id: str) -> bool:
        """Remove a waiting message without delivery or DSN (an operator's decision)."""
        return self._admin_move(queue_id, ("incoming", "deferred", "hold", "corrupt"), None)

    def _admin_move(self, queue_id: str, sources: tuple[str, ...], target: str | None) -> bool:
        """Rename the message from the first of `sources` that has it into `target` (remove it
        when `target` is None) and make that durable; False when none has it (an active
        message is a scheduler's: never touched here)."""
        for state in sources:
            try:
                if target is None:
                    self.path(state, queue_id).unlink()
                else:
                    os.rename(self.path(state, queue_id), self.path(target, queue_id))
            except FileNotFoundError:
                continue
            self._fsync_dir_now(self.directory / (target or state))
            return True
        return False
