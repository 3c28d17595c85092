"""``python -m bench.limiter_cpu [COUNT]``: CPU per delivery of the rate limiter's bookkeeping
alone (relay.throttle: `Limiter.acquire` then `Limiter.record` of a delivered recipient, on a
file-backed table as the workers share it), for a route without limits and for one with a
messagesPerSecond budget that never makes anyone wait; prints one JSON line per case
(``cpu_us``: process CPU per delivery). Run it with each tree first on ``PYTHONPATH`` to compare
two versions of relay.throttle.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from relay.config import RouteConfig
from relay.core.model import Disposition, Recipient, RecipientOutcome
from relay.throttle import Limiter, SharedTable


async def measure(limits: dict[str, Any], count: int) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-limiter-cpu-"))
    table = SharedTable(workdir / "buckets")
    try:
        limiter = Limiter(table, workers=2)
        route = RouteConfig(name="r", next_hop={"kind": "mx"}, limits=limits)
        delivered = [RecipientOutcome(Recipient("a@dest.test"), Disposition.DELIVERED, 250, "2.0.0", "ok")]
        start = time.process_time()
        for _ in range(count):
            async with limiter.acquire(route, "dest.test", 10) as refusal:
                assert refusal is None
            limiter.record(route, "dest.test", delivered)
        return (time.process_time() - start) / count * 1e6
    finally:
        table.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    for name, limits in (("no limits", {}), ("messagesPerSecond", {"messagesPerSecond": 100000})):
        print(
            json.dumps(
                {"case": name, "deliveries": count, "cpu_us": round(asyncio.run(measure(limits, count)), 1)}
            )
        )


if __name__ == "__main__":
    main()
