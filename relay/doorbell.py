"""The doorbell between the worker processes of one relay: who delivers a message just stored.

With ``workers: N`` every worker runs a front and a scheduler on one shared spool. Without a
doorbell the worker whose front stored a message would also deliver it, so one busy SMTP
session (a single client sending mail after mail) keeps one worker's event loop doing both
jobs while the other workers idle (measured: a single session ran at the speed of one core).
The supervisor makes one non-blocking pipe per worker; a front that stored a message writes its
queue id into the pipe of another worker (the others in turn), whose event loop reads it and
queues the message for delivery. With one busy session the other worker delivers everything
while the storing one keeps reading mail; under load every worker both accepts and delivers.
(A single pipe read by all workers was tried first: the storing worker, already awake, read a
third of its own records. Measured with one session.) The spool's rename claim still decides
who delivers, so a record read twice or late can never cause a second delivery.

Records are fixed-size (`RECORD` bytes) and written in one ``write`` (atomic below PIPE_BUF),
and reads ask for whole records, so a reader never sees part of one. Nothing here is needed
for correctness: when the pipe is full, or a worker dies with records it read, the message is
still in incoming/ and the scheduler's rescan (every few seconds) finds it; `ring` returns
False when the caller should queue the message itself.

This module moves queue ids between processes; it decides nothing about delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

RECORD = 24  # bytes per queue id record: the id, space padded, and a newline
_READ_RECORDS = 256


def encode_record(queue_id: str) -> bytes | None:
    """The pipe record for `queue_id`; None for an id that does not fit (the caller then
    queues the message itself)."""
    if not queue_id.isascii() or not queue_id.isalnum() or len(queue_id) > RECORD - 1:
        return None
    return queue_id.encode("ascii").ljust(RECORD - 1) + b"\n"


def decode_records(data: bytes) -> list[str]:
    """Queue ids from whole records (a trailing partial record, which cannot happen with
    atomic writes, is ignored)."""
    count = len(data) // RECORD
    return [data[i * RECORD : (i + 1) * RECORD].rstrip().decode("ascii") for i in range(count)]


class Doorbell:
    """One worker's view: the read end of its own pipe and the write ends of the other
    workers' pipes (file descriptors it owns)."""

    def __init__(self, read_fd: int, peer_write_fds: list[int]) -> None:
        self._read_fd = read_fd
        self._peers = list(peer_write_fds)
        self._next = 0
        for fd in (read_fd, *self._peers):
            os.set_blocking(fd, False)
        self._loop: asyncio.AbstractEventLoop | None = None

    def ring(self, queue_id: str) -> bool:
        """Hand a stored message to another worker (the next one in turn, or the one after
        when that pipe is full); False when the caller must queue it itself."""
        record = encode_record(queue_id)
        if record is None:
            return False
        for _ in range(len(self._peers)):
            fd = self._peers[self._next]
            self._next = (self._next + 1) % len(self._peers)
            try:
                if os.write(fd, record) == RECORD:
                    return True
            except OSError:  # full (EAGAIN), or that worker's end is gone
                continue
        return False

    def listen(self, deliver: Callable[[str], None]) -> None:
        """Call `deliver(queue_id)` on this event loop for every record this worker reads."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    data = os.read(self._read_fd, RECORD * _READ_RECORDS)
                except (BlockingIOError, InterruptedError):
                    return
                if not data:  # every write end is closed: nothing more will come
                    loop.remove_reader(self._read_fd)
                    return
                for queue_id in decode_records(data):
                    deliver(queue_id)
                if len(data) < RECORD * _READ_RECORDS:
                    return

        loop.add_reader(self._read_fd, readable)
        self._loop = loop

    def close(self) -> None:
        """Stop reading and writing (a stopping worker leaves new mail to the others)."""
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._read_fd)
            self._loop = None
        for fd in (self._read_fd, *self._peers):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = -1
        self._peers = []
