"""relay.doorbell: queue ids handed between worker processes through one shared pipe."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

import pytest

from relay.doorbell import RECORD, Doorbell, decode_records, encode_record
from relay.spool import new_queue_id


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    """One pipe per worker, as the supervisor makes them (three workers)."""
    made = [os.pipe() for _ in range(3)]
    yield made
    for read_fd, write_fd in made:
        os.close(read_fd)
        os.close(write_fd)


def worker_end(pipes: list[tuple[int, int]], index: int) -> Doorbell:
    """What worker `index` holds: copies of its own read end and of the others' write ends."""
    peers = [os.dup(write_fd) for n, (_read_fd, write_fd) in enumerate(pipes) if n != index]
    return Doorbell(os.dup(pipes[index][0]), peers)


def test_records_round_trip_and_odd_ids_are_refused() -> None:
    ids = [new_queue_id() for _ in range(3)]
    records = [encode_record(i) for i in ids]
    assert all(r is not None and len(r) == RECORD for r in records)
    assert decode_records(b"".join(r for r in records if r is not None)) == ids
    assert encode_record("../etc") is None
    assert encode_record("A" * RECORD) is None
    assert encode_record("") is None


async def test_records_go_to_the_other_workers_in_turn_never_back_to_the_ringer(
    pipes: list[tuple[int, int]],
) -> None:
    workers = [worker_end(pipes, n) for n in range(3)]
    seen: list[list[str]] = [[] for _ in workers]
    rung: list[list[str]] = [[] for _ in workers]
    total = 3000
    all_read = asyncio.Event()

    def reader(bucket: list[str]) -> Callable[[str], None]:
        def read(queue_id: str) -> None:
            bucket.append(queue_id)
            if sum(len(b) for b in seen) >= total:
                all_read.set()

        return read

    for worker, bucket in zip(workers, seen, strict=True):
        worker.listen(reader(bucket))
    try:
        for n in range(total):
            queue_id = new_queue_id()
            assert workers[n % 3].ring(queue_id)
            rung[n % 3].append(queue_id)
            if n % 100 == 0:
                await asyncio.sleep(0)  # let the readers drain now and then
        await asyncio.wait_for(all_read.wait(), 30)
    finally:
        for worker in workers:
            worker.close()
    every = [queue_id for bucket in seen for queue_id in bucket]
    assert sorted(every) == sorted(queue_id for ids in rung for queue_id in ids)  # none lost or twice
    for index in range(3):
        assert not set(seen[index]) & set(rung[index])  # nobody reads its own records
        assert len(seen[index]) == total // 3  # half of each of the two others' records


def test_a_full_pipe_goes_to_the_next_worker_and_all_full_or_closed_means_queue_it_yourself(
    pipes: list[tuple[int, int]],
) -> None:
    doorbell = worker_end(pipes, 0)
    rung = 0
    while doorbell.ring(new_queue_id()):  # nobody reads: both peers' pipes fill up
        rung += 1
        assert rung < 1_000_000
    assert rung * RECORD >= 2 * 4096  # a pipe holds at least a page, and both took records
    assert len(os.read(pipes[1][0], 1 << 20)) >= 4096 and len(os.read(pipes[2][0], 1 << 20)) >= 4096
    doorbell.close()
    assert doorbell.ring(new_queue_id()) is False
