"""What a relay reports about its queue: the JSON of ``GET /queue`` and the queue gauges of
``/metrics`` (issue 14: the operator reads /queue for ``status.queue`` and the Draining
condition; an HPA or KEDA scales on the gauges).

    {"pod": "edge-1", "draining": true, "depth": 12, "incoming": 0, "active": 1,
     "deferred": 10, "held": 1, "corrupt": 0, "oldestAgeSeconds": 431.2, "handedOff": 40,
     "drained": false}

``depth`` counts every message the spool holds, corrupt ones too (a spool with a quarantined
file is not empty: its volume must not be deleted); ``oldestAgeSeconds`` is the age of the
oldest message since its first acceptance (a handed-off message keeps its queue id, which
carries that time); ``drained`` is true only while draining with an empty spool and no SMTP
session open (so no transaction in flight).

Pure functions of a `relay.spool.QueueSnapshot` and the process's state; relay.app and
relay.health call them. No I/O here.
"""

from __future__ import annotations

from typing import Any

from relay.spool import QueueSnapshot


def oldest_age(snapshot: QueueSnapshot, now: float) -> float:
    return round(max(0.0, now - snapshot.oldest), 1) if snapshot.oldest is not None else 0.0


def queue_status(
    snapshot: QueueSnapshot,
    *,
    pod: str,
    draining: bool,
    busy: bool,
    handed_off: int,
    now: float,
    relay_safe: bool | None = None,
) -> dict[str, Any]:
    """The /queue document (``relaySafe``: the last open-relay self-check, relay.open_relay;
    null when none ran or it could not test)."""
    counts = snapshot.counts
    depth = snapshot.depth
    return {
        "pod": pod,
        "draining": draining,
        "depth": depth,
        "incoming": counts.get("incoming", 0),
        "active": counts.get("active", 0),
        "deferred": counts.get("deferred", 0),
        "held": counts.get("hold", 0),
        "corrupt": counts.get("corrupt", 0),
        "oldestAgeSeconds": oldest_age(snapshot, now),
        "handedOff": handed_off,
        "drained": draining and depth == 0 and not busy,
        "relaySafe": relay_safe,
    }


def metrics_text(snapshot: QueueSnapshot, now: float) -> str:
    """The queue gauges in the Prometheus text format, computed at scrape time."""
    return (
        "# HELP mailrelay_queue_depth Messages in the spool (every state, corrupt included)\n"
        "# TYPE mailrelay_queue_depth gauge\n"
        f"mailrelay_queue_depth {snapshot.depth}\n"
        "# HELP mailrelay_queue_oldest_age_seconds Age of the oldest message since its first acceptance\n"
        "# TYPE mailrelay_queue_oldest_age_seconds gauge\n"
        f"mailrelay_queue_oldest_age_seconds {oldest_age(snapshot, now)}\n"
    )
