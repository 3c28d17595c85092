"""The live status table of `mailrelay up`: what each relay's processes report over HTTP, summed
per relay and laid out as text.

`parse_metrics` reads one process's Prometheus text (relay/metrics.py names the series);
`build_rows` sums the processes of each relay; `render_table` lays rows out in columns. All pure:
the controller (`relay_operator.local.up`) does the HTTP polling and the printing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# Queue states that still hold work for the scheduler (hold and corrupt wait for a human).
_PENDING_STATES = frozenset({"incoming", "active", "deferred"})


@dataclass(frozen=True)
class MetricsSample:
    """The numbers one relay process reports; counters count since that process started."""

    queued: int = 0
    held: int = 0
    accepted: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    sessions: int = 0


def parse_metrics(text: str) -> MetricsSample:
    """Sum the series `mailrelay up` shows from one /metrics answer (unknown series are ignored)."""
    totals = {"queued": 0.0, "held": 0.0, "accepted": 0.0, "delivered": 0.0, "deferred": 0.0}
    totals.update({"bounced": 0.0, "sessions": 0.0})
    counters = {
        "mailrelay_messages_accepted_total": "accepted",
        "mailrelay_recipients_delivered_total": "delivered",
        "mailrelay_recipients_deferred_total": "deferred",
        "mailrelay_recipients_bounced_total": "bounced",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in counters:
                totals[counters[sample.name]] += sample.value
            elif sample.name == "mailrelay_queue_messages":
                state = sample.labels.get("state", "")
                if state in _PENDING_STATES:
                    totals["queued"] += sample.value
                elif state == "hold":
                    totals["held"] += sample.value
            elif sample.name == "mailrelay_smtp_sessions":
                totals["sessions"] += sample.value
    return MetricsSample(**{name: int(value) for name, value in totals.items()})


@dataclass(frozen=True)
class ListenerView:
    """One listener as the table shows it: its name, mode and the address `up` bound."""

    name: str
    mode: str
    address: str


@dataclass(frozen=True)
class ProcessView:
    """One replica process: name (``edge-0``), pid (None while down), readiness, last sample."""

    name: str
    pid: int | None
    ready: bool
    metrics_port: int
    sample: MetricsSample | None = None
    restarts: int = 0
    draining: bool = False  # scaled away: handing its queue to the others before it stops


@dataclass(frozen=True)
class RelayView:
    """A relay: its id (``namespace/name``), listeners and processes."""

    relay: str
    listeners: Sequence[ListenerView]
    processes: Sequence[ProcessView]
    replicas: int = field(default=0)


@dataclass(frozen=True)
class Row:
    relay: str
    listener: str
    address: str
    ready: str
    queue: str
    delivered: str
    deferred: str
    bounced: str


HEADER = Row("RELAY", "LISTENER", "ADDRESS", "READY", "QUEUE", "DELIVERED", "DEFERRED", "BOUNCED")


def _sum(samples: Iterable[MetricsSample], attribute: str) -> int:
    return sum(getattr(sample, attribute) for sample in samples)


def build_rows(relays: Iterable[RelayView]) -> list[Row]:
    """One row per listener; the relay's counts (summed over its processes) on its first row."""
    rows: list[Row] = []
    for relay in relays:
        samples = [p.sample for p in relay.processes if p.sample is not None]
        ready = sum(1 for p in relay.processes if p.ready and not p.draining)
        draining = sum(1 for p in relay.processes if p.draining)
        wanted = relay.replicas or len(relay.processes) - draining
        counts = [
            f"{ready}/{wanted}" + (f" +{draining} draining" if draining else ""),
            str(_sum(samples, "queued")) if samples else "-",
            str(_sum(samples, "delivered")) if samples else "-",
            str(_sum(samples, "deferred")) if samples else "-",
            str(_sum(samples, "bounced")) if samples else "-",
        ]
        for index, listener in enumerate(relay.listeners):
            shown = counts if index == 0 else [""] * len(counts)
            rows.append(
                Row(
                    relay.relay if index == 0 else "",
                    f"{listener.name} ({listener.mode})",
                    listener.address,
                    *shown,
                )
            )
    return rows


def render_table(rows: Sequence[Row]) -> list[str]:
    """Rows as aligned text lines, the header first."""
    table = [HEADER, *rows]
    columns = list(zip(*(tuple(vars(row).values()) for row in table), strict=True))
    widths = [max(len(cell) for cell in column) for column in columns]
    numeric = {4, 5, 6, 7}
    lines = []
    for row in table:
        cells = []
        for index, cell in enumerate(vars(row).values()):
            cells.append(cell.rjust(widths[index]) if index in numeric else cell.ljust(widths[index]))
        lines.append("  ".join(cells).rstrip())
    return lines
