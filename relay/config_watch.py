"""Watch the configuration file for changes the way Kubernetes makes them.

A mounted ConfigMap changes by an atomic symlink swap (``relay.yaml -> ..data/relay.yaml``,
``..data -> ..2024_05_01_12_00_00.123``): the file's own inode and mtime may not change where
the watcher looks, but its resolved path does. So the watcher polls, about once a second, the
resolved path plus the resolved file's inode, size and mtime, and calls back when any differ.
Polling costs one stat per second and works on every file system (inotify does not see a
swap of a parent symlink reliably).

Called by relay.app; the callback loads and validates (and keeps the old config if invalid).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Stamp = tuple[str, int, int, int] | None


def file_stamp(path: Path) -> Stamp:
    """(resolved path, inode, size, mtime ns) of the file, or None if it cannot be read."""
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return (real, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class ConfigWatcher:
    """Calls `on_change` (from the event loop) when the file at `path` changes."""

    def __init__(self, path: Path, on_change: Callable[[], None], interval: float = 1.0) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.interval = interval
        self._stamp = file_stamp(self.path)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="config-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def check(self) -> bool:
        """Poll once; True (and the callback called) when the file changed."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp or stamp is None:
            # A vanished file (mid-swap) is not a change: wait for the new one.
            return False
        self._stamp = stamp
        try:
            self.on_change()
        except Exception:
            log.exception("config reload failed")
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()
