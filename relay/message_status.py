"""What became of each recipient of a message submitted over the HTTP API, after the message has
left the spool: the records behind ``GET /v1/messages/{queueId}``.

A record is a small JSON file ``<queue directory>/status/<queueId>.json``. relay.http_api creates
it *before* it stores the message (so a delivery that settles at once finds it), the scheduler's
settle hook (`settled`) updates it after each attempt, and records older than `RETENTION` are
pruned. While the message is still in the spool its queue file is the truth (relay.http_api
reads it first); the record only says what the spool no longer can (delivered, bounced). Records
are not fsynced: losing one in a crash loses a status answer, never mail.

Messages that did not come through the API have no record and cost one ``stat`` per attempt.
Decides nothing about mail; the state names are relay.core.model's dispositions plus ``queued``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from relay.core.model import QueueEntry, RecipientOutcome
from relay.core.settle import Attempted, Settlement

log = logging.getLogger(__name__)

RETENTION = 7 * 86400.0  # seconds a record is kept after its last change
QUEUE_ID = re.compile(r"^[0-9A-F]{10,32}$")


def outcome_view(outcome: RecipientOutcome, *, next_attempt: float | None = None) -> dict[str, Any]:
    """One recipient's state as the API shows it."""
    view: dict[str, Any] = {
        "address": outcome.recipient.address,
        "state": outcome.disposition.value,
        "code": outcome.code,
        "enhanced": outcome.status,
        "text": outcome.text,
    }
    if outcome.remote_mta:
        view["nextHop"] = outcome.remote_mta
    if outcome.disposition.value == "bounced" and outcome.status == "4.4.7":
        view["expired"] = True
    if next_attempt is not None and outcome.disposition.value == "deferred":
        view["nextAttempt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(next_attempt))
    return view


class StatusBook:
    """The records of one spool (shared by its worker processes)."""

    def __init__(self, queue_directory: Path) -> None:
        self.directory = Path(queue_directory) / "status"

    def _path(self, queue_id: str) -> Path:
        if not QUEUE_ID.match(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        return self.directory / f"{queue_id}.json"

    def _write(self, queue_id: str, record: dict[str, Any]) -> None:
        path = self._path(queue_id)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, path)

    def created(self, queue_id: str, client: str, recipients: Iterable[str]) -> None:
        """A message about to be stored for `client` (blocking)."""
        self._write(
            queue_id,
            {
                "queueId": queue_id,
                "client": client,
                "recipients": [{"address": a, "state": "queued"} for a in recipients],
            },
        )

    def forget(self, queue_id: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._path(queue_id).unlink()

    def read(self, queue_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._path(queue_id).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def tracked(self, queue_id: str) -> bool:
        """Whether the message has a record (one stat; cheap enough for every attempt)."""
        try:
            return self._path(queue_id).exists()
        except ValueError:
            return False

    def settled(self, queue_id: str, results: Iterable[Attempted], next_attempt: float | None) -> None:
        """Write one attempt's outcomes into the message's record, if it has one (blocking)."""
        record = self.read(queue_id)
        if record is None:
            return
        latest = {
            r.outcome.recipient.address: outcome_view(r.outcome, next_attempt=next_attempt) for r in results
        }
        record["recipients"] = [latest.get(item["address"], item) for item in record.get("recipients", [])]
        self._write(queue_id, record)

    async def on_settled(self, entry: QueueEntry, settlement: Settlement) -> None:
        """The scheduler's settle hook: update the record of a message that has one."""
        if not self.tracked(entry.queue_id):
            return
        next_attempt = settlement.deferred.next_attempt if settlement.deferred is not None else None
        await asyncio.to_thread(self.settled, entry.queue_id, settlement.results, next_attempt)

    def prune(self, now: float | None = None) -> int:
        """Remove records unchanged for `RETENTION` (blocking); returns how many."""
        cutoff = (time.time() if now is None else now) - RETENTION
        removed = 0
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed
