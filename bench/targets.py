"""The targets of issue 13, as data, and how a run's summary is judged against them: the one
place that says what each target measures and when it is met. `bench.run` prints every target
with its figure and met / not met; `bench.report` puts the same lines into bench/RESULTS.md.

Ratios are mailrelay/Postfix of the medians of the same run's interleaved repeats (both
durable, Postfix in the variant the run used). A target whose figure the run did not measure
(a scenario left out) says "not measured", never met. "Flat" per-message cost is read as at
most 1.2x from the shallowest to the deepest queue.

Pure: rows in (bench.run's summary), verdicts out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Target:
    label: str  # as the table names it
    figure: Literal["ratio", "cpu", "p99", "queued_bytes", "flat", "ready"]
    scenario: str
    case: str  # the summary's case ("" for figures over several cases)
    op: Literal[">=", "<=", "<"]
    goal: float
    stretch: float | None = None
    unit: str = "x"
    group: Literal["target", "keep"] = "target"


TARGETS: tuple[Target, ...] = (
    Target("2 KB, 20 sessions, defaults", "ratio", "one-hop", "2KB x20", ">=", 1.5, 2.0),
    Target("2 KB, 1 session", "ratio", "one-hop", "2KB x1", ">=", 1.2, 1.5),
    Target("100 KB, 20 sessions", "ratio", "one-hop", "100KB x20", ">=", 1.5, 2.0),
    Target("100 KB, 1 session", "ratio", "one-hop", "100KB x1", ">=", 1.2),
    Target(
        "three relays chained vs three Postfix chained", "ratio", "chain", "2KB x20 3 hops", ">=", 1.5, 2.0
    ),
    Target("relay CPU per 2 KB message", "cpu", "one-hop", "2KB x20", "<=", 1.6, 1.0, unit=" ms"),
    Target("p99 latency at 20 sessions (2 KB)", "p99", "one-hop", "2KB x20", "<=", 1.0, unit="x Postfix's"),
    Target("memory per queued message", "queued_bytes", "queue", "", "<=", 1024, unit=" B", group="keep"),
    Target(
        "flat per-message cost from 10,000 to 100,000 queued", "flat", "queue", "", "<=", 1.2, group="keep"
    ),
    Target("100,000-message spool ready", "ready", "recovery", "", "<", 5.0, unit=" s", group="keep"),
)


FULL_REPEATS = 3  # "medians of >= 3 interleaved runs"
SHALLOW, DEEP = 10_000, 100_000  # the queue depths the "keep" targets name


@dataclass(frozen=True)
class Verdict:
    target: Target
    value: float | None  # None: not measured in this run
    detail: str
    caveat: str = ""  # why the figure is not the target's full measure (fewer runs, smaller queue)

    @property
    def met(self) -> bool:
        return self.value is not None and _holds(self.target.op, self.value, self.target.goal)

    @property
    def stretch_met(self) -> bool:
        stretch = self.target.stretch
        return self.value is not None and stretch is not None and _holds(self.target.op, self.value, stretch)

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        status = "met (stretch too)" if self.stretch_met else "met" if self.met else "NOT met"
        return status + (f" ({self.caveat})" if self.caveat else "")

    def goal_text(self) -> str:
        t = self.target
        text = f"{t.op} {t.goal:g}{t.unit}"
        return text + (f" (stretch {t.stretch:g}{t.unit})" if t.stretch is not None else "")

    def value_text(self) -> str:
        if self.value is None:
            return "-"
        unit = self.target.unit if self.target.figure != "p99" else "x"
        digits = 0 if self.target.figure == "queued_bytes" else 2
        # never round a figure onto its goal (1.496 is not 1.50 when the goal is 1.5)
        while digits < 4 and f"{self.value:.{digits}f}" == f"{self.target.goal:.{digits}f}":
            digits += 1
        return f"{self.value:.{digits}f}{unit}"


def _holds(op: str, value: float, goal: float) -> bool:
    if op == ">=":
        return value >= goal
    if op == "<=":
        return value <= goal
    return value < goal


def _index(rows: Iterable[Row]) -> dict[tuple[str, str, str], Row]:
    return {(r["scenario"], r["case"], r["system"]): r for r in rows}


def _caveat_runs(*rows: Row | None, key: str = "runs") -> str:
    runs = min((r.get(key) or 0) if r else 0 for r in rows)
    return f"{runs} run{'s' if runs != 1 else ''} only" if runs < FULL_REPEATS else ""


def _judge(target: Target, rows: list[Row]) -> Verdict:
    index = _index(rows)
    mine = index.get((target.scenario, target.case, "mailrelay"))
    theirs = index.get((target.scenario, target.case, "postfix"))
    if target.figure == "ratio":
        if mine and theirs and mine.get("rate") and theirs.get("rate"):
            ratio = mine["rate"] / theirs["rate"]
            detail = f"{mine['rate']:.0f} vs {theirs['rate']:.0f} msg/s"
            return Verdict(target, ratio, detail, _caveat_runs(mine, theirs))
        return Verdict(target, None, "")
    if target.figure == "cpu":
        if mine and mine.get("cpu_ms_per_msg") is not None:
            other = (
                f"; Postfix {theirs['cpu_ms_per_msg']:.2f} ms"
                if theirs and theirs.get("cpu_ms_per_msg")
                else ""
            )
            return Verdict(target, mine["cpu_ms_per_msg"], f"{target.case}{other}", _caveat_runs(mine))
        return Verdict(target, None, "")
    if target.figure == "p99":
        if mine and theirs and mine.get("p99_ms") and theirs.get("p99_ms"):
            return Verdict(
                target,
                mine["p99_ms"] / theirs["p99_ms"],
                f"{mine['p99_ms']:.0f} vs {theirs['p99_ms']:.0f} ms",
                _caveat_runs(mine, theirs, key="latency_runs"),
            )
        return Verdict(target, None, "")
    mailrelay_rows = [r for r in rows if r["scenario"] == target.scenario and r["system"] == "mailrelay"]
    if target.figure == "queued_bytes":
        sized = sorted(
            (r["depth"], r["bytes_per_queued_msg"]) for r in mailrelay_rows if r.get("bytes_per_queued_msg")
        )
        if not sized:
            return Verdict(target, None, "")
        deepest, value = sized[-1]  # at small depths the baseline's noise dominates
        detail = ", ".join(f"{b:.0f} B at {d:,}" for d, b in sized)
        return Verdict(target, value, detail, _caveat_depth(deepest))
    if target.figure == "flat":
        costs = sorted((r["depth"], r["cpu_ms_per_msg"]) for r in mailrelay_rows if r.get("cpu_ms_per_msg"))
        if len(costs) < 2:
            return Verdict(target, None, "")
        high, high_cost = costs[-1]
        low, low_cost = next(((d, c) for d, c in costs[:-1] if d == SHALLOW), costs[0])
        caveat = "" if (low, high) == (SHALLOW, DEEP) else f"{low:,} to {high:,} queued"
        return Verdict(
            target,
            high_cost / low_cost,
            f"fill CPU {high_cost:.2f} ms/msg at {high:,} vs {low_cost:.2f} at {low:,} queued",
            caveat,
        )
    # ready
    ready = [r for r in mailrelay_rows if r.get("seconds") is not None]
    if not ready:
        return Verdict(target, None, "")
    row = ready[0]
    count = int(row["case"].split()[0])
    return Verdict(target, row["seconds"], row["case"], _caveat_depth(count))


def _caveat_depth(depth: int) -> str:
    return "" if depth >= DEEP else f"{depth:,} messages, not {DEEP:,}"


def judge(rows: Iterable[Row]) -> list[Verdict]:
    """A verdict for every target, in the issue's order."""
    listed = list(rows)
    return [_judge(target, listed) for target in TARGETS]


def lines(verdicts: Iterable[Verdict]) -> list[str]:
    """One aligned line per target: label, goal, figure (detail), status."""
    items = list(verdicts)
    if not items:
        return []
    label_w = max(len(v.target.label) for v in items)
    goal_w = max(len(v.goal_text()) for v in items)
    out = []
    group = ""
    for v in items:
        if v.target.group != group:
            group = v.target.group
            out.append("targets (issue 13):" if group == "target" else "keep:")
        figure = v.value_text() + (f" ({v.detail})" if v.detail else "")
        out.append(f"  {v.target.label:<{label_w}}  {v.goal_text():<{goal_w}}  {figure:<48}  {v.status}")
    return out
