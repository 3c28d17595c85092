"""Processes the benchmark starts, and what they cost, read from /proc.

CPU: the sum of ``utime + stime + cutime + cstime`` over a process tree (the root and every
live descendant). A child that exits and is reaped moves its time into its parent's
``cutime``/``cstime``, so the sum stays continuous while Postfix's master starts and retires
smtpd/cleanup/smtp processes; the difference between two readings is the CPU the tree used.

Memory: the sum of ``Pss`` (proportional set size, /proc/PID/smaps_rollup) over the live
tree: a page shared by n processes counts 1/n in each, so Postfix's dozens of processes sharing
libraries are not counted dozens of times. The kernel keeps no PSS high-water mark, so
`PeakSampler` samples the sum every 0.25 s during a run and keeps the maximum.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may contain spaces
    return data[data.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def children(pid: int) -> list[int]:
    """The live direct children of `pid`."""
    return sorted(_children_map().get(pid, []))


def tree(roots: Iterable[int]) -> list[int]:
    """The root pids that are alive plus all their live descendants."""
    children = _children_map()
    seen: list[int] = []
    stack = [pid for pid in roots if Path(f"/proc/{pid}").exists()]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(children.get(pid, []))
    return seen


def cpu_seconds(roots: Iterable[int]) -> float:
    """CPU seconds used so far by the tree under `roots` (see the module docstring)."""
    total = 0
    for pid in tree(roots):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # fields[0] is state (field 3); utime is field 14 -> index 11
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLOCK_TICKS


def own_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds of exactly these processes (utime + stime, no descendants)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(roots: Iterable[int]) -> int:
    return sum(_status_kb(pid, "VmRSS") for pid in tree(roots)) * 1024


def peak_rss_bytes(roots: Iterable[int]) -> int:
    return sum(_status_kb(pid, "VmHWM") for pid in tree(roots)) * 1024


def pss_bytes(roots: Iterable[int]) -> int:
    total = 0
    for pid in tree(roots):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total * 1024


class PeakSampler:
    """The highest `pss_bytes` of a tree seen while running (sampled every `interval`)."""

    def __init__(self, roots: Iterable[int], interval: float = 0.25) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, pss_bytes(self.roots))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakSampler:
        if self.roots:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.roots:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, pss_bytes(self.roots))


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM by pid, wait, then SIGKILL by pid."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def kill_tree(pids: Iterable[int]) -> None:
    """SIGKILL every live process of a tree, by pid (fallback cleanup only)."""
    for pid in reversed(tree(pids)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
