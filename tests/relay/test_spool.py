"""relay.spool: durable store, atomic claims, deferral and crash recovery on a real directory."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from relay.core.model import Envelope, QueueEntry, Recipient
from relay.spool import (
    CorruptEntryError,
    Spool,
    SpoolError,
    SpoolFullError,
    SpoolReadOnlyError,
    _classify,
    encode,
    new_queue_id,
)

CONTENT = b"Subject: hi\r\n\r\nbody\r\n"


def make_entry(queue_id: str | None = None) -> QueueEntry:
    rcpts = (Recipient("a@example.com"), Recipient("b@example.com", notify=("FAILURE",)))
    return QueueEntry(
        queue_id=queue_id or new_queue_id(),
        envelope=Envelope(mail_from="s@example.org", recipients=rcpts),
        arrival=1_700_000_000.0,
        pending=rcpts,
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "q")
    s.prepare()
    yield s
    s.close()


async def test_store_claim_complete(spool: Spool) -> None:
    entry = make_entry()
    await spool.store(entry, CONTENT)
    assert spool.ids("incoming") == [entry.queue_id]
    message = await spool.claim(entry.queue_id)
    assert message is not None
    assert message.content == CONTENT
    assert message.entry.pending == entry.pending
    assert message.entry.size == len(CONTENT)
    assert await spool.claim(entry.queue_id) is None  # already active
    await spool.complete(entry.queue_id)
    assert spool.depth() == dict.fromkeys(("incoming", "active", "deferred", "hold", "corrupt"), 0)


async def test_concurrent_stores_are_all_durable(spool: Spool) -> None:
    entries = [make_entry() for _ in range(50)]
    await asyncio.gather(*(spool.store(e, CONTENT) for e in entries))
    assert sorted(spool.ids("incoming")) == sorted(e.queue_id for e in entries)


async def test_store_fsyncs_the_file_once_it_has_its_final_name(spool: Spool, synced: list[str]) -> None:
    """One fsync per stored message, issued after the rename into incoming/: that fsync makes
    the name durable too (the rename changed the inode), so no directory fsync is needed. An
    fsync before the rename would leave the name to the next journal commit: a 250 could be
    answered for mail a power loss then takes away."""
    entry = make_entry()
    await spool.store(entry, CONTENT)
    assert synced == [str(spool.path("incoming", entry.queue_id))]


async def test_defer_makes_the_content_durable_before_it_replaces_the_claimed_copy(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = make_entry()
    await spool.store(entry, CONTENT)
    message = await spool.claim(entry.queue_id)
    assert message is not None
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).parent.name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await spool.defer(message.entry.with_changes(attempts=1, next_attempt=1.0), message.content)
    assert synced == ["tmp", "deferred"]


async def test_only_one_claim_wins(spool: Spool) -> None:
    entry = make_entry()
    await spool.store(entry, CONTENT)
    results = await asyncio.gather(*(spool.claim(entry.queue_id) for _ in range(10)))
    assert sum(r is not None for r in results) == 1


async def test_defer_keeps_due_time_in_mtime(spool: Spool) -> None:
    entry = make_entry()
    await spool.store(entry, CONTENT)
    message = await spool.claim(entry.queue_id)
    assert message is not None
    later = message.entry.with_changes(attempts=1, next_attempt=2_000_000_000.0, pending=entry.pending[:1])
    await spool.defer(later, message.content)
    assert spool.ids("active") == []
    assert list(spool.scan_deferred()) == [(entry.queue_id, 2_000_000_000.0)]
    again = await spool.claim(entry.queue_id)
    assert again is not None and again.entry.attempts == 1 and len(again.entry.pending) == 1


async def test_requeue_unchanged_puts_the_claimed_file_back_as_it_is(spool: Spool) -> None:
    entry = make_entry()
    await spool.store(entry, CONTENT)
    claimed = await spool.claim(entry.queue_id)
    assert claimed is not None
    before = spool.path("active", entry.queue_id).read_bytes()
    await spool.requeue_unchanged(entry.queue_id, 2_000_000_000.0)
    assert spool.ids("active") == []
    assert list(spool.scan_deferred()) == [(entry.queue_id, 2_000_000_000.0)]
    assert spool.path("deferred", entry.queue_id).read_bytes() == before
    with pytest.raises(SpoolError):  # nothing claimed under that id any more
        await spool.requeue_unchanged(entry.queue_id, 2_000_000_000.0)


async def test_claim_due_by_leaves_a_message_that_is_not_due(spool: Spool) -> None:
    entry = make_entry()
    await spool.store(entry, CONTENT)
    message = await spool.claim(entry.queue_id)
    assert message is not None
    await spool.defer(message.entry.with_changes(attempts=1, next_attempt=2_000_000_000.0), message.content)
    assert await spool.claim(entry.queue_id, due_by=1_999_999_999.0) is None
    assert list(spool.scan_deferred()) == [(entry.queue_id, 2_000_000_000.0)]
    assert spool.ids("active") == []
    again = await spool.claim(entry.queue_id, due_by=2_000_000_000.0)
    assert again is not None and again.entry.attempts == 1


async def test_a_worker_claiming_during_a_deferral_does_not_lose_the_message(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers share one spool. Worker B claims a message the instant it shows up in
    deferred/ (it had seen the id earlier); worker A's deferral must not then remove B's copy."""
    other = Spool(spool.directory)
    entry = make_entry()
    await spool.store(entry, CONTENT)
    message = await spool.claim(entry.queue_id)
    assert message is not None
    claimed: list[object] = []
    real_rename, real_replace = os.rename, os.replace

    def claim_when_deferred(dst: object) -> None:
        if not claimed and Path(str(dst)).parent.name == "deferred":
            claimed.append(other._claim(entry.queue_id, ("incoming", "deferred"), None))

    def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
        real_rename(src, dst, *args, **kwargs)  # type: ignore[arg-type]
        claim_when_deferred(dst)

    def replace(src: object, dst: object, *args: object, **kwargs: object) -> None:
        real_replace(src, dst, *args, **kwargs)  # type: ignore[arg-type]
        claim_when_deferred(dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    try:
        await spool.defer(message.entry.with_changes(attempts=1, next_attempt=1.0), message.content)
    finally:
        monkeypatch.undo()
        other.close()
    assert len(claimed) == 1 and claimed[0] is not None  # B won the message...
    assert spool.ids("active") == [entry.queue_id]  # ...and still has it
    found = spool.read(entry.queue_id)
    assert found is not None and found[1].entry.attempts == 1


async def test_scan_deferred_takes_remembered_due_times_and_stats_the_rest(spool: Spool) -> None:
    ids = []
    for due in (2_000_000_000.0, 2_000_000_100.0):
        entry = make_entry()
        await spool.store(entry, CONTENT)
        message = await spool.claim(entry.queue_id)
        assert message is not None
        await spool.defer(message.entry.with_changes(next_attempt=due), message.content)
        ids.append(entry.queue_id)
    known = {ids[0]: 1_000.0, "GONE": 5.0}  # a remembered (stale) time and a vanished message
    assert sorted(spool.scan_deferred(known)) == sorted([(ids[0], 1_000.0), (ids[1], 2_000_000_100.0)])


def test_recover_requeues_active_drops_partial_and_quarantines(spool: Spool) -> None:
    good = make_entry()
    (spool.directory / "active" / good.queue_id).write_bytes(encode(good, CONTENT))
    (spool.directory / "tmp" / "half-written").write_bytes(b"MRQ1 {")
    (spool.directory / "active" / "BROKEN1").write_bytes(b"garbage")
    stale = make_entry()
    (spool.directory / "active" / stale.queue_id).write_bytes(encode(stale, CONTENT))
    (spool.directory / "deferred" / stale.queue_id).write_bytes(encode(stale, CONTENT))
    report = spool.recover()
    assert (report.requeued, report.discarded_partial, report.quarantined, report.duplicates_removed) == (
        1,
        1,
        1,
        1,
    )
    assert spool.ids("incoming") == [good.queue_id]
    assert spool.ids("corrupt") == ["BROKEN1"]
    assert spool.ids("deferred") == [stale.queue_id]
    assert spool.ids("active") == []


def test_recover_drops_the_deferred_copy_of_a_held_message(spool: Spool) -> None:
    held, other = make_entry(), make_entry()
    for state in ("hold", "deferred"):
        (spool.directory / state / held.queue_id).write_bytes(encode(held, CONTENT))
    (spool.directory / "deferred" / other.queue_id).write_bytes(encode(other, CONTENT))
    report = spool.recover()
    assert report.duplicates_removed == 1
    assert spool.ids("hold") == [held.queue_id]
    assert spool.ids("deferred") == [other.queue_id]


async def test_truncated_file_is_quarantined_on_claim(spool: Spool) -> None:
    entry = make_entry().with_changes(size=len(CONTENT))
    data = encode(entry, CONTENT)
    (spool.directory / "incoming" / entry.queue_id).write_bytes(data[:-5])
    with pytest.raises(CorruptEntryError):
        await spool.claim(entry.queue_id)
    assert spool.ids("corrupt") == [entry.queue_id]


@pytest.mark.parametrize("recipients", [2, 300])  # a header within the first read, and a longer one
@pytest.mark.parametrize("size", [0, 100, 4000, 100_000])  # content within the first read, and beyond
async def test_claim_reads_header_and_content_whatever_their_sizes(
    spool: Spool, recipients: int, size: int
) -> None:
    """The claim reads the header line first and the content into its own bytes (no copy of
    the whole file); every split of the file between the two reads gives the message back."""
    rcpts = tuple(Recipient(f"user{n}@example.com") for n in range(recipients))
    entry = QueueEntry(new_queue_id(), Envelope("s@example.org", rcpts), 1.0, rcpts, wire_ready=True)
    content = (b"x" * 70 + b"\r\n") * (size // 72) + b"y" * (size % 72)
    await spool.store(entry, content)
    message = await spool.claim(entry.queue_id)
    assert message is not None and message.content == content
    assert message.entry.pending == rcpts and message.entry.size == len(content) and message.entry.wire_ready
    assert (spool.directory / "active" / entry.queue_id).read_bytes() == encode(message.entry, content)


async def test_truncated_header_is_quarantined_on_claim(spool: Spool) -> None:
    entry = make_entry()
    header_line = encode(entry, b"")
    for queue_id, data in ((new_queue_id(), header_line[:-1]), (new_queue_id(), b"MRQ1 " + b"x" * 9000)):
        (spool.directory / "incoming" / queue_id).write_bytes(data)
        with pytest.raises(CorruptEntryError):
            await spool.claim(queue_id)
        assert queue_id in spool.ids("corrupt")


async def test_concurrent_claims_and_completes_each_get_their_own_result(spool: Spool) -> None:
    """Claims and removals that queue up together run as one batch; every caller still gets
    its own message, its own None or its own error."""
    good = [make_entry() for _ in range(20)]
    for entry in good:
        await spool.store(entry, CONTENT)
    broken = make_entry().with_changes(size=len(CONTENT))
    (spool.directory / "incoming" / broken.queue_id).write_bytes(encode(broken, CONTENT)[:-5])
    missing = new_queue_id()
    results = await asyncio.gather(
        *(spool.claim(e.queue_id) for e in good),
        spool.claim(broken.queue_id),
        spool.claim(missing),
        return_exceptions=True,
    )
    for entry, result in zip(good, results[:20], strict=True):
        assert not isinstance(result, BaseException) and result is not None
        assert result.entry.queue_id == entry.queue_id
    assert isinstance(results[20], CorruptEntryError)
    assert results[21] is None
    await asyncio.gather(*(spool.complete(e.queue_id) for e in good))
    assert spool.ids("active") == [] and spool.ids("corrupt") == [broken.queue_id]


async def test_admin_hold_retry_delete(spool: Spool) -> None:
    entry = make_entry()
    await spool.store(entry, CONTENT)
    assert spool.hold(entry.queue_id)
    assert spool.ids("hold") == [entry.queue_id]
    assert spool.retry_now(entry.queue_id)
    assert spool.ids("incoming") == [entry.queue_id]
    assert spool.delete(entry.queue_id)
    assert spool.locate(entry.queue_id) is None


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOSPC, SpoolFullError),
        (errno.EDQUOT, SpoolFullError),
        (errno.EROFS, SpoolReadOnlyError),
        (errno.EACCES, SpoolReadOnlyError),
        (errno.EIO, SpoolError),
    ],
)
def test_os_errors_map_to_spool_errors(code: int, kind: type[SpoolError]) -> None:
    error = _classify(OSError(code, os.strerror(code)))
    assert type(error) is kind
