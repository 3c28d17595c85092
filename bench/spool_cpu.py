"""``python -m bench.spool_cpu SIZE COUNT``: CPU per message of the spool's hot path alone
(store with fsync, claim, complete) for COUNT messages of SIZE bytes from 20 concurrent
tasks, as the front and scheduler call it; prints one JSON line (``cpu_us`` is process CPU
per message, every thread included). Run it with each tree first on ``PYTHONPATH`` to compare
two versions of relay.spool without the rest of the relay's noise.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from relay.core.model import Envelope, QueueEntry, Recipient
from relay.spool import Spool, new_queue_id

LINE = b"La de da de da 1. La de da de da 2. La de da de da 3. La de da de da 4.\r\n"


async def measure(size: int, count: int, tasks: int = 20) -> dict[str, float]:
    content = (LINE * (size // len(LINE) + 1))[: max(size - 2, 0)] + b"\r\n"
    rcpts = (Recipient("user@dest.test"),)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-spool-cpu-"))
    spool = Spool(workdir / "q")
    spool.prepare()

    async def one() -> None:
        for _ in range(count // tasks):
            entry = QueueEntry(
                new_queue_id(), Envelope("s@x.test", rcpts), time.time(), rcpts, size=len(content)
            )
            await spool.store(entry, content)
            message = await spool.claim(entry.queue_id)
            assert message is not None and message.content == content
            await spool.complete(entry.queue_id)

    try:
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.gather(*(one() for _ in range(tasks)))
        done = count // tasks * tasks
        return {"cpu_us": (time.process_time() - cpu) / done * 1e6, "wall_s": time.monotonic() - wall}
    finally:
        spool.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    size, count = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps({"size": size, "count": count, **asyncio.run(measure(size, count))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
