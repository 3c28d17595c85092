"""How many worker processes ``workers: auto`` means: the CPUs this process may use.

Pure: the caller (relay.cpus) reads the cgroup files and the affinity mask and passes their text
and size here. The rule, in order: a cgroup CPU quota (v2 ``cpu.max`` "QUOTA PERIOD", or v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) rounded up, never more than the CPUs in the
affinity mask; without a quota, the affinity mask; at least 1, at most `MAX_WORKERS` (the
config's limit). A Kubernetes ``resources.limits.cpu`` of 1500m becomes a quota of 150000/100000
and so 2 workers, the same answer the operator renders from the quantity (`workers_for_cpu`).

What it must not do: read files or call the OS.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

MAX_WORKERS = 64


def quota_cpus_v2(cpu_max: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line ("max 100000" is no quota)."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_cpus_v1(quota_us: str | None, period_us: str | None) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 is no quota)."""
    try:
        quota, period = int((quota_us or "").strip()), int((period_us or "").strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def auto_workers(quota_cpus: float | None, affinity_cpus: int | None) -> int:
    """The worker count for ``workers: auto``."""
    cpus = affinity_cpus if affinity_cpus and affinity_cpus > 0 else 1
    if quota_cpus is not None and quota_cpus > 0:
        cpus = min(cpus, math.ceil(quota_cpus))
    return max(1, min(cpus, MAX_WORKERS))


_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)(m?)\s*$")


def workers_for_cpu(quantity: str | int | float) -> int:
    """Workers for a Kubernetes CPU quantity ("500m" -> 1, "1" -> 1, "1500m" -> 2, "2.5" -> 3),
    rounded up, 1 to `MAX_WORKERS`. Raises ValueError for a quantity that is not a CPU amount."""
    match = _QUANTITY.match(str(quantity))
    if match is None:
        raise ValueError(f"not a CPU quantity: {quantity!r} (use e.g. 500m, 1, 2.5)")
    value = Decimal(match.group(1))  # the pattern admits only decimals
    if match.group(2) == "m":
        value /= 1000
    return max(1, min(math.ceil(value), MAX_WORKERS))
