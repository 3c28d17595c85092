"""Durable files: write a new file under a temporary name, fsync it, rename it into place.

The one implementation of the write-fsync-rename sequence shared by the spool (relay.spool:
queue files) and the maildir gateway (relay.gateways.maildir: delivered copies). Where the
fsync goes is the caller's decision, because it is tuned per use:

- the spool fsyncs a new queue file once, *after* the rename (that one fsync commits the
  content and the new name on the file systems a spool uses; see relay.spool), and before the
  rename too only when the rename replaces a durable copy;
- a Maildir copy is fsynced before its rename into ``new/``, then the directory is fsynced
  (the Maildir convention; a mail store may be any file system).

This module decides no order and classifies no error: it raises the OSError it got, after
removing a temporary file that was not renamed. Blocking calls: run it in a thread.
(operator/relay_operator/local/layout.py has a copy of its own for the operator's local state
files: the operator may import only relay.config and relay.core.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path


def write_all(fd: int, data: bytes | Sequence[bytes]) -> None:
    """Write every byte of `data` (one buffer, or several written in order with one writev,
    so a header and a body need not be joined into a copy first) to `fd`; os.write and
    os.writev may write less than they were given."""
    if isinstance(data, bytes):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return
    views = [memoryview(part) for part in data if part]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def commit(
    tmp: str | Path,
    data: bytes | Sequence[bytes],
    moves: Sequence[str | Path],
    *,
    fsync_before_rename: bool,
    fsync_after_rename: bool,
    mtime: float | None = None,
    mode: int = 0o600,
) -> None:
    """Create `tmp` (it must not exist), write `data` (bytes, or parts in order), set its mtime
    when given, fsync it if `fsync_before_rename`, rename it through `moves` in order (the last
    is where it stays), then fsync it again if `fsync_after_rename` (the same open file: it
    commits the new name too).

    Raises the OSError; `tmp` is removed when the failure came after it was created and before
    the first rename, a file already renamed is left to the caller."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # a name in use is not ours to remove
    try:
        try:
            write_all(fd, data)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            if fsync_before_rename:
                os.fsync(fd)
            source: str | Path = tmp
            for target in moves:
                os.replace(source, target)
                source = target
            if fsync_after_rename:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, making the names created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
