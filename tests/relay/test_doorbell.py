"""relay.doorbell: queue ids handed between worker processes through one shared pipe."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

import pytest

from relay.doorbell import RECORD, Doorbell, decode_records, encode_record
from relay.spool import new_queue_id


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


def worker_end(pipe: tuple[int, int]) -> Doorbell:
    """What one worker holds: its own copies of both ends, as a spawned worker gets them."""
    return Doorbell(os.dup(pipe[0]), os.dup(pipe[1]))


def test_records_round_trip_and_odd_ids_are_refused() -> None:
    ids = [new_queue_id() for _ in range(3)]
    records = [encode_record(i) for i in ids]
    assert all(r is not None and len(r) == RECORD for r in records)
    assert decode_records(b"".join(r for r in records if r is not None)) == ids
    assert encode_record("../etc") is None
    assert encode_record("A" * RECORD) is None
    assert encode_record("") is None


async def test_a_record_rung_by_one_worker_is_read_by_another(pipe: tuple[int, int]) -> None:
    storing, idle = worker_end(pipe), worker_end(pipe)
    got: asyncio.Queue[str] = asyncio.Queue()
    idle.listen(got.put_nowait)
    try:
        queue_id = new_queue_id()
        assert storing.ring(queue_id)
        assert await asyncio.wait_for(got.get(), 10) == queue_id
    finally:
        storing.close()
        idle.close()


async def test_each_record_goes_to_exactly_one_listening_worker(pipe: tuple[int, int]) -> None:
    workers = [worker_end(pipe) for _ in range(3)]
    seen: list[list[str]] = [[] for _ in workers]
    ids = [new_queue_id() for _ in range(2000)]
    all_read = asyncio.Event()

    def reader(bucket: list[str]) -> Callable[[str], None]:
        def read(queue_id: str) -> None:
            bucket.append(queue_id)
            if sum(len(b) for b in seen) >= len(ids):
                all_read.set()

        return read

    for worker, bucket in zip(workers, seen, strict=True):
        worker.listen(reader(bucket))
    try:
        for n, queue_id in enumerate(ids):
            assert workers[n % 3].ring(queue_id)
            if n % 100 == 0:
                await asyncio.sleep(0)  # let the readers drain now and then
        await asyncio.wait_for(all_read.wait(), 30)
    finally:
        for worker in workers:
            worker.close()
    every = [queue_id for bucket in seen for queue_id in bucket]
    assert sorted(every) == sorted(ids)  # none lost, none twice, none torn


def test_a_full_pipe_or_a_closed_doorbell_tells_the_caller_to_queue_it_itself(
    pipe: tuple[int, int],
) -> None:
    doorbell = worker_end(pipe)
    rung = 0
    while doorbell.ring(new_queue_id()):  # nobody reads: the pipe fills up
        rung += 1
        assert rung < 1_000_000
    assert rung * RECORD >= 4096  # a pipe holds at least a page
    doorbell.close()
    assert doorbell.ring(new_queue_id()) is False
