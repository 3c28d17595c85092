"""A run's raw results turned into what is read: medians per case and system, the header that
says what ran, the tables, and the target lines (bench.targets judges them). Used by
``bench.run`` (terminal) and ``bench.report`` (Markdown for bench/RESULTS.md).

Throughput figures (msg/s, CPU per message, peak PSS) are medians over the throughput runs of a
case; latency figures (p50, p99) are percentiles over every probe of its latency runs (pooled:
a run has a few hundred probes, too few for a p99 of its own): never from the same runs.
Pure: dictionaries in, text out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = dict[str, Any]


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (0.99: the value 99% of the probes did not exceed)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[Row]:
    """One row per (scenario, case, system), in the order the runs were made."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["scenario"], run["case"], run["system"]), []).append(run)
    rows: list[Row] = []
    for (scenario, case, system), items in groups.items():
        measured = [r for r in items if r["kind"] != "latency"]
        latency = [r for r in items if r["kind"] == "latency"]
        pooled = [ms for r in latency for ms in r["extra"].get("latencies_ms", [])]
        row: Row = {
            "scenario": scenario,
            "case": case,
            "system": system,
            "runs": len(measured),
            "latency_runs": len(latency),
            "rate": median(r["rate"] for r in measured),
            "cpu_ms_per_msg": median(r["cpu_ms_per_msg"] for r in measured),
            "peak_pss_mb": median(r["peak_pss_mb"] for r in measured),
            "seconds": median(r["seconds"] for r in measured),
            # latency percentiles over every probe of the case's latency runs (pooled)
            "p50_ms": percentile(pooled, 0.5),
            "p99_ms": percentile(pooled, 0.99),
            "probes": sum(r["probes"] for r in latency),
            "probes_lost": sum(r["probes_lost"] for r in latency),
            "incomplete": sum(1 for r in items if not r["complete"]),
            "load_before": median(r.get("load_before") for r in items),
            "launcher_cpu_ms_per_msg": median(r["extra"].get("launcher_cpu_ms_per_msg") for r in measured),
        }
        if scenario == "queue":
            row["depth"] = items[0]["extra"]["depth"]
            row["bytes_per_queued_msg"] = median(r["extra"]["bytes_per_queued_msg"] for r in items)
        rows.append(row)
    ceilings = {r["case"]: r["rate"] for r in rows if r["scenario"] == "ceiling"}
    for row in rows:
        if row["scenario"] == "one-hop" and ceilings.get(row["case"]) and row["rate"]:
            row["share_of_ceiling"] = round(row["rate"] / ceilings[row["case"]], 3)
    return rows


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float | int) else str(value)


def _runs(row: Mapping[str, Any]) -> str:
    text = str(row["runs"])
    if row.get("latency_runs"):
        text += f"+{row['latency_runs']}"
    if row["incomplete"]:
        text += f" ({row['incomplete']} incomplete)"
    return text


LOAD_HEAD = [
    "scenario",
    "case",
    "system",
    "msg/s",
    "share",
    "CPU ms/msg",
    "peak MB",
    "p50 ms",
    "p99 ms",
    "runs",
]
QUEUE_HEAD = [
    "scenario",
    "case",
    "system",
    "PSS MB",
    "B per queued msg",
    "fill msg/s",
    "fill CPU ms/msg",
    "seconds",
]


def _which(row: Mapping[str, Any]) -> list[str]:
    """The columns every table starts with: scenario, case, system."""
    return [row["scenario"], row["case"], row["system"]]


def load_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            *_which(r),
            _fmt(r["rate"], 0),
            _fmt(r.get("share_of_ceiling"), 2),
            _fmt(r["cpu_ms_per_msg"], 2),
            _fmt(r["peak_pss_mb"], 1),
            _fmt(r["p50_ms"], 1),
            _fmt(r["p99_ms"], 1),
            _runs(r),
        ]
        for r in rows
        if r["scenario"] in ("ceiling", "one-hop", "chain", "variants")
    ]


def queue_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            *_which(r),
            _fmt(r["peak_pss_mb"], 1),
            _fmt(r.get("bytes_per_queued_msg"), 0),
            _fmt(r["rate"] if r["scenario"] == "queue" else None, 0),
            _fmt(r["cpu_ms_per_msg"], 2),
            _fmt(r["seconds"], 2),
        ]
        for r in rows
        if r["scenario"] in ("queue", "recovery")
    ]


def text_table(head: list[str], body: list[list[str]]) -> str:
    if not body:
        return ""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=False))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in body]
    return "\n".join(lines)


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    if not body:
        return ""
    align = ["---" if i < 3 else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def variant_notes(rows: Sequence[Mapping[str, Any]], default: str, margin: float = 0.05) -> list[str]:
    """For each case of the `variants` scenario, whether another variant beat the default by
    more than `margin` in this run (then the default deserves a second look)."""
    notes = []
    cases: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["scenario"] == "variants" and r["rate"]:
            cases.setdefault(r["case"], {})[r["system"]] = r["rate"]
    for case, rates in cases.items():
        mine = rates.get(default)
        best, rate = max(rates.items(), key=lambda item: item[1])
        if mine is None or best == default:
            continue
        if rate > mine * (1 + margin):
            notes.append(
                f"note: at {case} variant {best} did {rate:.0f} msg/s, {100 * (rate / mine - 1):.0f}% more "
                f"than the default {default} ({mine:.0f})"
            )
    return notes


def header(info: Mapping[str, Any]) -> list[str]:
    """What ran: machine, commit, both systems' settings, overrides (the lines of the header)."""
    s = info["settings"]
    dirty = info.get("dirty") or []
    commit = info["commit"] + (f" (uncommitted changes: {', '.join(dirty)})" if dirty else "")
    lines = [
        f"{info['date']} on {info['cores']} cores ({info['cpu']}), kernel {info['kernel']}, "
        f"Python {info['python']}, Postfix {info['postfix']}",
        f"commit {commit}; load average before the run {info['load_before']}; "
        f"{info['repeat']} interleaved repeat(s){', quick' if info.get('quick') else ''}",
        f"Postfix: variant {s['postfix_variant']}; durable queue (cleanup fsyncs before 250), logging "
        "through postlogd to a file",
        f"mailrelay: {s['mailrelay_launch']} on configs rendered by `mailrelay up`'s planner from MailRelay "
        f"manifests with the spec's defaults (workers {s['mailrelay_workers_spec']} = "
        f"{s['mailrelay_workers']} here, default listener limits, durable spool)",
        f"delivery concurrency per destination: Postfix {s['postfix_destination_concurrency']} "
        f"(default_destination_concurrency_limit), mailrelay {s['mailrelay_workers']} workers x "
        f"queue.maxPerDestination {s['mailrelay_max_per_destination']} = "
        f"{s['mailrelay_workers'] * s['mailrelay_max_per_destination']}",
        f"retry schedule: Postfix minimal_backoff_time {s['postfix_backoff'][0]}, maximal "
        f"{s['postfix_backoff'][1]}; mailrelay minBackoff {s['mailrelay_backoff'][0]}, maxBackoff "
        f"{s['mailrelay_backoff'][1]} (both as shipped)",
    ]
    for override in info.get("overrides") or []:
        lines.append(f"OVERRIDE (not the defaults): {override}")
    return lines
