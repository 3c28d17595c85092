"""The state directory of `mailrelay up`: where each relay replica's config, spool and mounted
Secrets live on this machine, and how they are written.

Layout under the state directory (default ``.mailrelay/`` in the current folder)::

    up.lock                                   held while an `up` runs (one supervisor per state dir)
    status.json                               the live table as JSON (for scripts and tests)
    <namespace>/<relay>/secrets/<secret>/<key> a Secret, as a pod would see it mounted
    <namespace>/<relay>/<relay>-<i>/relay.yaml  replica i's rendered config (written atomically)
    <namespace>/<relay>/<relay>-<i>/spool/      replica i's queue (survives restarts of `up`)

One spool per replica mirrors a StatefulSet's volume claim per pod: each relay process owns its
queue, so a crashed process recovering its spool never touches mail a sibling has claimed.

Called by `relay_operator.local.up`. It writes files and nothing else: no processes, no sockets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO


class StateDirBusyError(Exception):
    """Another `mailrelay up` holds this state directory."""


@dataclass(frozen=True)
class StateDir:
    """Paths under one state directory; pure path arithmetic, no I/O."""

    root: Path

    def relay_dir(self, namespace: str, relay: str) -> Path:
        return self.root / namespace / relay

    def secret_dir(self, namespace: str, relay: str, secret: str) -> Path:
        return self.relay_dir(namespace, relay) / "secrets" / secret

    def replica_dir(self, namespace: str, relay: str, index: int) -> Path:
        return self.relay_dir(namespace, relay) / f"{relay}-{index}"

    def config_file(self, namespace: str, relay: str, index: int) -> Path:
        return self.replica_dir(namespace, relay, index) / "relay.yaml"

    def spool_dir(self, namespace: str, relay: str, index: int) -> Path:
        return self.replica_dir(namespace, relay, index) / "spool"

    @property
    def lock_file(self) -> Path:
        return self.root / "up.lock"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Replace `path` with `data` in one rename, so a reader (a relay watching its config file)
    sees the old or the new content, never a half-written file. Returns False when the file
    already held exactly `data` (nothing written, no reload triggered)."""
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return True


def write_secret(directory: Path, data: Mapping[str, bytes]) -> None:
    """Materialise one Secret as a mounted volume: one file per key, readable by the owner only.
    Keys that disappeared from the Secret are removed, as the kubelet does on update."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for key, value in data.items():
        if "/" in key or key in ("", ".", ".."):
            raise ValueError(f"invalid Secret key {key!r}")
        write_atomically(directory / key, value, mode=0o600)
    for stale in directory.iterdir():
        if stale.is_file() and stale.name not in data and not stale.name.startswith("."):
            stale.unlink()


def count_queued(spool: Path) -> int:
    """Messages waiting in a spool directory that no process serves (a replica scaled away):
    files in its incoming, active and deferred folders. A cheap count for a warning, no parsing."""
    total = 0
    for state in ("incoming", "active", "deferred"):
        with contextlib.suppress(FileNotFoundError):
            total += sum(1 for entry in (spool / state).iterdir() if entry.is_file())
    return total


@contextlib.contextmanager
def locked(state: StateDir) -> Iterator[IO[str]]:
    """Hold the state directory for the lifetime of one `up` (an advisory flock, released by
    the kernel when the process dies, even on SIGKILL)."""
    state.root.mkdir(parents=True, exist_ok=True)
    with state.lock_file.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                raise StateDirBusyError(
                    f"{state.root} is in use by a running `mailrelay up` (pid {owner}); "
                    "stop it or pass a different --state-dir"
                ) from exc
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield handle
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
