"""Reads what ``workers: auto`` depends on: the cgroup CPU quota and the affinity mask of this
process, and turns them into a worker count with relay.core.cpus (the rule lives there).

Who calls it: relay.app when a config says ``workers: auto``. It never raises: a file that is
missing or unreadable counts as "no quota".
"""

from __future__ import annotations

import os
from pathlib import Path

from relay.config import RelayConfig
from relay.core.cpus import auto_workers, quota_cpus_v1, quota_cpus_v2

CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def quota_cpus(root: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup, in CPUs, or None without one (v2, then v1)."""
    root = CGROUP if root is None else root
    v2 = quota_cpus_v2(_read(root / "cpu.max"))
    if v2 is not None:
        return v2
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        v1 = quota_cpus_v1(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us"))
        if v1 is not None:
            return v1
    return None


def affinity_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def available_workers() -> int:
    """What ``workers: auto`` means on this machine, for this process."""
    return auto_workers(quota_cpus(), affinity_cpus())


def worker_count(config: RelayConfig) -> int:
    """The number of worker processes the config asks for (``auto`` resolved here)."""
    return available_workers() if config.workers == "auto" else config.workers
