"""``python -m bench.run``: mailrelay side by side with Postfix on this machine (see README.md).

Scenarios (``--scenarios``, comma separated; default all):
- ``ceiling``: smtp-source straight into smtp-sink, the machine's upper bound for each case;
- ``one-hop``: smtp-source -> relay -> smtp-sink, 2 KB and 100 KB at 1, 20 and 50 sessions;
- ``chain``: three relays in a row vs the last relay of the same chain alone (2 KB, 20 sessions);
- ``queue``: next hop down, fill to 10,000 and 100,000 deferred messages: RSS per queued message
  and the fill cost per message at each depth;
- ``recovery``: a spool pre-filled with 100,000 deferred messages by the spool's own writer;
  seconds from process start to ``/readyz`` (recovered and indexed) for mailrelay.

Every run counts arrivals at the sink; each figure is the median over ``--repeat`` runs, and the
two systems alternate order between repeats. Every process started is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procs
from bench.sinks import CountingSink, ProbeSender, ProbeSink, latencies
from bench.systems import REPO, Hop, Mailrelay, Postfix, System, postfix_version

SCENARIOS = ("ceiling", "one-hop", "chain", "queue", "recovery")
SIZES = {"2KB": 2048, "100KB": 102400}
SESSIONS = (1, 20, 50)
# messages per run (full); --quick divides by 5
MESSAGES = {
    ("2KB", 1): 2000,
    ("2KB", 20): 10000,
    ("2KB", 50): 10000,
    ("100KB", 1): 500,
    ("100KB", 20): 2000,
    ("100KB", 50): 2000,
}

TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("one-hop", "2KB x20"): (">=", 1.5),
    ("one-hop", "100KB x1"): (">=", 1.0),
    ("one-hop", "100KB x20"): (">=", 1.0),
    ("one-hop", "100KB x50"): (">=", 1.0),
    ("one-hop", "2KB x1"): (">=", 1.0),
}


@dataclass
class Run:
    scenario: str
    case: str
    system: str
    repeat: int
    messages: int
    seconds: float
    rate: float  # messages/s counted at the sink
    accept_rate: float  # messages/s as smtp-source saw them accepted
    p50_ms: float | None
    p99_ms: float | None
    probes: int
    probes_lost: int
    cpu_ms_per_msg: float | None
    peak_pss_mb: float | None
    complete: bool
    extra: dict[str, Any] = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ----------------------------------------------------------------------------- one load run


def smtp_source(port: int, size: int, sessions: int, messages: int, timeout: float) -> tuple[bool, str]:
    command = [
        "smtp-source",
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-M",
        "source.bench.test",
        "-f",
        "source@bench.test",
        "-t",
        "user@dest.test",
        f"127.0.0.1:{port}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False, "smtp-source timed out"
    return result.returncode == 0, (result.stdout + result.stderr).strip()[-500:]


def wait_drained(system: System | None, timeout: float = 120.0) -> None:
    if system is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(system.queued().values()):
            return
        time.sleep(0.1)
    log(f"warning: {system.name} still has mail queued: {system.queued()}")


def load_run(
    scenario: str,
    case: str,
    label: str,
    system: System | None,
    entry_port: int,
    sink: CountingSink,
    probe_sink: ProbeSink | None,
    size: int,
    sessions: int,
    messages: int,
    repeat: int,
    probe_interval: float,
) -> Run:
    """smtp-source -> entry_port; count `messages` arrivals at `sink`; probe latency meanwhile."""
    roots = system.pids() if system is not None else []
    base = sink.count
    sampler = procs.PeakSampler(roots).__enter__()
    cpu_before = procs.cpu_seconds(roots)
    sender = None
    if probe_sink is not None:
        sender = ProbeSender(
            "127.0.0.1", entry_port, size, probe_interval, f"{label}-{case}-{repeat}".replace(" ", "")
        )
        sender.start()
    timeout = 120 + messages / 10
    started = time.monotonic()
    ok, output = smtp_source(entry_port, size, sessions, messages, timeout)
    accepted_at = time.monotonic()
    if not ok:
        log(f"warning: smtp-source against {label}: {output}")
    complete = sink.wait_for(base + messages, timeout=timeout)
    arrived = sink.count - base
    finished = sink.arrival(base + min(arrived, messages)) if arrived else time.monotonic()
    lat: list[float] = []
    lost = 0
    if sender is not None and probe_sink is not None:
        sender.stop()
        lat, lost = latencies(sender, probe_sink)
    wait_drained(system)
    cpu = procs.cpu_seconds(roots) - cpu_before if roots else None
    sampler.__exit__(None, None, None)
    peak = sampler.peak if roots else None
    seconds = max(finished - started, 1e-9)
    handled = min(arrived, messages) + (len(lat) if lat else 0)
    return Run(
        scenario=scenario,
        case=case,
        system=label,
        repeat=repeat,
        messages=min(arrived, messages),
        seconds=round(seconds, 3),
        rate=round(min(arrived, messages) / seconds, 1),
        accept_rate=round(messages / max(accepted_at - started, 1e-9), 1),
        p50_ms=None if not lat else round(1000 * (percentile(lat, 0.5) or 0), 1),
        p99_ms=None if not lat else round(1000 * (percentile(lat, 0.99) or 0), 1),
        probes=len(lat),
        probes_lost=lost,
        cpu_ms_per_msg=None if cpu is None or not handled else round(1000 * cpu / handled, 3),
        peak_pss_mb=None if peak is None else round(peak / 2**20, 1),
        complete=complete and ok,
    )


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Options:
    quick: bool
    repeat: int
    workers: int
    workdir: Path
    probe_interval: float
    sizes: list[str]
    sessions: list[int]
    queue_depths: list[int]
    recovery_messages: int
    systems: list[str]


class Bench:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.runs: list[Run] = []
        self.notes: list[str] = []
        self._cleanup: list[Callable[[], None]] = []

    # -- lifecycle helpers

    @contextlib.contextmanager
    def started(self, thing: Any) -> Iterator[Any]:
        thing.start()
        try:
            yield thing
        finally:
            with contextlib.suppress(Exception):
                thing.stop()

    def messages(self, size: str, sessions: int) -> int:
        count = MESSAGES[(size, sessions)]
        return max(100, count // 5) if self.o.quick else count

    def order(self, repeat: int) -> list[str]:
        systems = list(self.o.systems)
        return systems if repeat % 2 == 0 else systems[::-1]

    def make(self, kind: str, name: str, next_hop: Hop, probe: Hop | None, **kw: Any) -> Postfix | Mailrelay:
        if kind == "postfix":
            return Postfix(name, self.o.workdir, next_hop, probe)
        return Mailrelay(name, self.o.workdir, next_hop, probe, workers=self.o.workers, **kw)

    def warm(self, system: System, sink: CountingSink) -> None:
        base = sink.count
        smtp_source(system.port, 2048, 20, 200, 120)
        sink.wait_for(base + 200, timeout=60)
        wait_drained(system)

    # -- ceiling and one hop

    def cases(self) -> list[tuple[str, int]]:
        return [(size, s) for size in self.o.sizes for s in self.o.sessions]

    def ceiling(self) -> None:
        with self.started(CountingSink()) as sink:
            for repeat in range(self.o.repeat):
                for size, sessions in self.cases():
                    case = f"{size} x{sessions}"
                    run = load_run(
                        "ceiling",
                        case,
                        "direct",
                        None,
                        sink.port,
                        sink,
                        None,
                        SIZES[size],
                        sessions,
                        self.messages(size, sessions),
                        repeat,
                        self.o.probe_interval,
                    )
                    log(f"ceiling {case}: {run.rate} msg/s")
                    self.runs.append(run)

    def one_hop(self) -> None:
        with self.started(CountingSink()) as sink, self.started(ProbeSink()) as probe:
            hop, probe_hop = Hop("127.0.0.1", sink.port), Hop("127.0.0.1", probe.port)
            systems: dict[str, System] = {}
            try:
                for kind in self.o.systems:
                    systems[kind] = self.make(kind, f"{kind}-1hop", hop, probe_hop)
                    systems[kind].start()
                    self.warm(systems[kind], sink)
                for repeat in range(self.o.repeat):
                    for size, sessions in self.cases():
                        case = f"{size} x{sessions}"
                        for kind in self.order(repeat):
                            run = load_run(
                                "one-hop",
                                case,
                                kind,
                                systems[kind],
                                systems[kind].port,
                                sink,
                                probe,
                                SIZES[size],
                                sessions,
                                self.messages(size, sessions),
                                repeat,
                                self.o.probe_interval,
                            )
                            log(
                                f"one-hop {case} {kind}: {run.rate} msg/s p50 {run.p50_ms} ms "
                                f"p99 {run.p99_ms} ms cpu {run.cpu_ms_per_msg} ms/msg"
                            )
                            self.runs.append(run)
            finally:
                for system in systems.values():
                    system.stop()

    def chain(self) -> None:
        size, sessions = "2KB", 20
        with self.started(CountingSink()) as sink, self.started(ProbeSink()) as probe:
            probe_hop = Hop("127.0.0.1", probe.port)
            chains: dict[str, list[System]] = {}
            try:
                for kind in self.o.systems:
                    last = self.make(kind, f"{kind}-c3", Hop("127.0.0.1", sink.port), probe_hop)
                    middle = self.make(kind, f"{kind}-c2", Hop("127.0.0.1", last.port), None)
                    first = self.make(kind, f"{kind}-c1", Hop("127.0.0.1", middle.port), None)
                    chains[kind] = [first, middle, last]
                    for system in (last, middle, first):
                        system.start()
                    self.warm(first, sink)
                for repeat in range(self.o.repeat):
                    for kind in self.order(repeat):
                        first, middle, last = chains[kind]
                        for case, entry in (("1 hop", last), ("3 hops", first)):
                            group = _Group(kind, [first, middle, last] if entry is first else [last])
                            run = load_run(
                                "chain",
                                f"{size} x{sessions} {case}",
                                kind,
                                group,
                                entry.port,
                                sink,
                                probe,
                                SIZES[size],
                                sessions,
                                self.messages(size, sessions) * 2 // 5,
                                repeat,
                                self.o.probe_interval,
                            )
                            log(f"chain {case} {kind}: {run.rate} msg/s p50 {run.p50_ms} ms")
                            self.runs.append(run)
            finally:
                for chain in chains.values():
                    for system in chain:
                        system.stop()

    # -- queue depth and recovery

    def queue(self) -> None:
        dead = Hop("127.0.0.1", procs.free_port())  # nothing listens there: every attempt fails
        for kind in self.o.systems:
            extra: dict[str, Any] = {"mailrelay": {"min_backoff": "1h"}}.get(kind, {})
            system = self.make(kind, f"{kind}-queue", dead, None, **extra)
            system.start()
            try:
                self._fill(kind, system)
            finally:
                system.stop()

    def _fill(self, kind: str, system: System) -> None:
        roots = system.pids()
        smtp_source(system.port, 2048, 20, 100, 120)  # warm up: start every process once
        self._settle(system, 100)
        baseline = procs.pss_bytes(roots)
        depth = 100
        for target in self.o.queue_depths:
            # fill up to `measure` messages short of the target without measuring, then measure
            # the cost of the last `measure` messages: the per-message cost at this depth
            measure = min(5000, max(target // 10, 500))
            if target - measure > depth:
                ok, output = smtp_source(system.port, 2048, 20, target - measure - depth, 1800)
                if not ok:
                    log(f"warning: queue fill {kind}: {output}")
                self._settle(system, target - measure)
                depth = target - measure
            chunk = target - depth
            cpu0 = procs.cpu_seconds(roots)
            started = time.monotonic()
            ok, output = smtp_source(system.port, 2048, 20, chunk, 600 + chunk / 20)
            accepted = time.monotonic() - started
            if not ok:
                log(f"warning: queue fill {kind}: {output}")
            settled = self._settle(system, target)
            settle_seconds = time.monotonic() - started
            cpu = procs.cpu_seconds(roots) - cpu0
            time.sleep(6.0)  # past one rescan of the deferred queue (5 s) before reading memory
            rss = procs.pss_bytes(roots)
            depth = target
            run = Run(
                scenario="queue",
                case=f"{target} deferred",
                system=kind,
                repeat=0,
                messages=chunk,
                seconds=round(settle_seconds, 2),
                rate=round(chunk / settle_seconds, 1),
                accept_rate=round(chunk / accepted, 1),
                p50_ms=None,
                p99_ms=None,
                probes=0,
                probes_lost=0,
                cpu_ms_per_msg=round(1000 * cpu / chunk, 3),
                peak_pss_mb=round(rss / 2**20, 1),
                complete=ok and settled,
                extra={
                    "pss_baseline_mb": round(baseline / 2**20, 1),
                    "bytes_per_queued_msg": round((rss - baseline) / target, 1),
                    "queued": system.queued(),
                },
            )
            log(
                f"queue {kind} {target}: {run.extra['bytes_per_queued_msg']} B/msg, fill {run.rate} msg/s, "
                f"{run.cpu_ms_per_msg} ms CPU/msg"
            )
            self.runs.append(run)

    def _settle(self, system: System, total: int, timeout: float = 900.0) -> bool:
        """Until every message is deferred (nothing incoming or active)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = system.queued()
            busy = sum(v for k, v in queued.items() if k != "deferred")
            if queued.get("deferred", 0) >= total and busy == 0:
                return True
            time.sleep(0.2)
        log(f"warning: {system.name} did not settle: {system.queued()}")
        return False

    def recovery(self) -> None:
        if "mailrelay" not in self.o.systems:
            return
        count = self.o.recovery_messages
        system = Mailrelay(
            "mailrelay-recovery",
            self.o.workdir,
            Hop("127.0.0.1", procs.free_port()),
            None,
            workers=self.o.workers,
            min_backoff="1h",
        )
        log(f"recovery: writing {count} deferred messages with the spool's writer")
        started = time.monotonic()
        prefill_spool(system.spool_dir, count)
        log(f"recovery: pre-filled in {time.monotonic() - started:.1f}s")
        for repeat in range(self.o.repeat):
            system.start(wait=False)
            try:
                ready = system.wait_ready(timeout=600)
                rss = procs.pss_bytes(system.pids())
            finally:
                system.stop()
            run = Run(
                scenario="recovery",
                case=f"{count} deferred",
                system="mailrelay",
                repeat=repeat,
                messages=count,
                seconds=round(ready, 3),
                rate=round(count / ready, 1),
                accept_rate=0.0,
                p50_ms=None,
                p99_ms=None,
                probes=0,
                probes_lost=0,
                cpu_ms_per_msg=None,
                peak_pss_mb=round(rss / 2**20, 1),
                complete=True,
                extra={"queued_after": system.queued()},
            )
            log(f"recovery {count}: ready after {ready:.2f}s, PSS {run.peak_pss_mb} MB")
            self.runs.append(run)


class _Group:
    """Several systems measured as one (a chain)."""

    def __init__(self, name: str, members: list[System]) -> None:
        self.name = name
        self.members = members
        self.port = members[0].port

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def pids(self) -> list[int]:
        return [pid for member in self.members for pid in member.pids()]

    def queued(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for member in self.members:
            for key, value in member.queued().items():
                total[key] = total.get(key, 0) + value
        return total


def prefill_spool(directory: Path, count: int) -> None:
    """`count` deferred 2 KB messages (next attempt in an hour) written by relay.spool itself."""
    from relay.core.model import Envelope, QueueEntry, Recipient
    from relay.spool import Spool, new_queue_id

    spool = Spool(directory, fsync=False)
    spool.prepare()
    body = (b"x" * 76 + b"\r\n") * 26
    now = time.time()
    try:
        for number in range(count):
            queue_id = new_queue_id()
            content = (
                f"Subject: prefill {number}\r\nMessage-Id: <{queue_id}@bench.test>\r\n\r\n".encode() + body
            )
            recipient = Recipient(f"user{number}@dest.test")
            entry = QueueEntry(
                queue_id=queue_id,
                envelope=Envelope("source@bench.test", (recipient,)),
                arrival=now,
                pending=(recipient,),
                attempts=1,
                next_attempt=now + 3600,
                client_address="127.0.0.1",
                helo="source.bench.test",
                size=len(content),
            )
            # the spool's own writer (its commit path), straight into deferred/
            spool._commit(entry, content, (str(spool.path("deferred", queue_id)),), entry.next_attempt)
    finally:
        spool.close()
    os.sync()


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix_version(),
        "mailrelay_commit": commit,
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.scenario, run.case, run.system), []).append(run)
    rows = []
    for (scenario, case, system), items in groups.items():
        row: dict[str, Any] = {
            "scenario": scenario,
            "case": case,
            "system": system,
            "runs": len(items),
            "rate": median([r.rate for r in items]),
            "p50_ms": median([r.p50_ms for r in items]),
            "p99_ms": median([r.p99_ms for r in items]),
            "cpu_ms_per_msg": median([r.cpu_ms_per_msg for r in items]),
            "peak_pss_mb": median([r.peak_pss_mb for r in items]),
            "seconds": median([r.seconds for r in items]),
            "incomplete": sum(1 for r in items if not r.complete),
        }
        if scenario == "queue":
            row["bytes_per_queued_msg"] = median([r.extra["bytes_per_queued_msg"] for r in items])
        rows.append(row)
    ceilings = {r["case"]: r["rate"] for r in rows if r["scenario"] == "ceiling"}
    for row in rows:
        if row["scenario"] == "one-hop" and row["case"] in ceilings and row["rate"]:
            row["share_of_ceiling"] = round(row["rate"] / ceilings[row["case"]], 3)
    return rows


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    index = {(r["scenario"], r["case"], r["system"]): r for r in rows}
    for (scenario, case, system), row in sorted(index.items()):
        if system != "mailrelay" or scenario not in ("one-hop", "chain"):
            continue
        other = index.get((scenario, case, "postfix"))
        if not other or not other["rate"] or not row["rate"]:
            continue
        ratio = row["rate"] / other["rate"]
        target = TARGETS.get((scenario, case))
        verdict = ""
        if target:
            verdict = f" (target {target[0]} {target[1]}x: {'met' if ratio >= target[1] else 'NOT met'})"
        lines.append(
            f"{scenario} {case}: mailrelay/Postfix = {ratio:.2f}x "
            f"({row['rate']:.0f} vs {other['rate']:.0f} msg/s){verdict}"
        )
    for system in ("mailrelay", "postfix"):
        one = index.get(("chain", "2KB x20 1 hop", system))
        three = index.get(("chain", "2KB x20 3 hops", system))
        if one and three and one["rate"] and three["rate"]:
            ratio = three["rate"] / one["rate"]
            note = (
                " (target >= 0.9x: " + ("met" if ratio >= 0.9 else "NOT met") + ")"
                if system == "mailrelay"
                else ""
            )
            lines.append(f"chain {system}: 3 hops / 1 hop = {ratio:.2f}x{note}")
    for system in ("mailrelay", "postfix"):
        depths = sorted(
            (int(r["case"].split()[0]), r) for r in rows if r["scenario"] == "queue" and r["system"] == system
        )
        for depth, row in depths:
            note = ""
            if system == "mailrelay":
                note = f" (target <= 1024 B: {'met' if row['bytes_per_queued_msg'] <= 1024 else 'NOT met'})"
            lines.append(
                f"queue {system} {depth} deferred: {row['bytes_per_queued_msg']:.0f} B PSS per queued "
                f"message{note}; fill {row['cpu_ms_per_msg']} ms CPU/msg at {row['rate']} msg/s"
            )
        if len(depths) >= 2 and depths[0][1]["cpu_ms_per_msg"] and depths[-1][1]["cpu_ms_per_msg"]:
            ratio = depths[-1][1]["cpu_ms_per_msg"] / depths[0][1]["cpu_ms_per_msg"]
            note = (
                f" (target flat, <= 1.2x: {'met' if ratio <= 1.2 else 'NOT met'})"
                if system == "mailrelay"
                else ""
            )
            lines.append(
                f"queue {system}: CPU per message at {depths[-1][0]} vs {depths[0][0]} queued = "
                f"{ratio:.2f}x{note}"
            )
    for row in rows:
        if row["scenario"] == "recovery":
            ok = "met" if row["seconds"] < 10 else "NOT met"
            lines.append(f"recovery {row['case']}: ready after {row['seconds']:.2f} s (target < 10 s: {ok})")
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "scenario",
        "case",
        "system",
        "msg/s",
        "share",
        "p50 ms",
        "p99 ms",
        "CPU ms/msg",
        "peak MB",
        "runs",
    ]
    body = [
        [
            r["scenario"],
            r["case"],
            r["system"],
            _fmt(r["rate"], ".0f"),
            _fmt(r.get("share_of_ceiling"), ".2f"),
            _fmt(r["p50_ms"], ".1f"),
            _fmt(r["p99_ms"], ".1f"),
            _fmt(r["cpu_ms_per_msg"], ".3f"),
            _fmt(r["peak_pss_mb"], ".1f"),
            f"{r['runs']}" + (f" ({r['incomplete']} incomplete)" if r["incomplete"] else ""),
        ]
        for r in rows
        if r["scenario"] in ("ceiling", "one-hop", "chain")
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=False))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def report(info: dict[str, str], runs: list[Run], options: Options, path: Path) -> None:
    """Write the raw results and print the table and the target lines (also after an interrupt)."""
    rows = summarize(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": info, "summary": rows, "runs": [asdict(r) for r in runs]}
    path.write_text(json.dumps(data, indent=1))
    print(
        f"\nmailrelay vs Postfix -- {info['date']}, {info['cores']} cores, Python {info['python']}, "
        f"Postfix {info['postfix']}, mailrelay workers={options.workers}, medians of {options.repeat} run(s)"
    )
    print(table(rows))
    print()
    for line in verdicts(rows):
        print(line)
    print(f"\nraw results: {path}", flush=True)


def ensure_tools() -> None:
    missing = [tool for tool in ("postfix", "smtp-source", "smtp-sink", "postconf") if not shutil.which(tool)]
    if missing:
        log(f"installing Debian packages for: {', '.join(missing)}")
        subprocess.run(["bash", str(REPO / "scripts" / "install-system-deps.sh")], check=True)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (a private Postfix instance needs it)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages, one repeat, smaller queues")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma separated subset of " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--repeat", type=int, default=None, help="runs per case (default 3, quick 1)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="mailrelay worker processes")
    parser.add_argument("--sizes", default=",".join(SIZES), help="message sizes: 2KB,100KB")
    parser.add_argument(
        "--sessions", default=",".join(map(str, SESSIONS)), help="concurrent sessions: 1,20,50"
    )
    parser.add_argument("--systems", default="postfix,mailrelay", help="postfix,mailrelay")
    parser.add_argument(
        "--queue-depths", default=None, help="deferred depths (default 10000,100000; quick 2000,10000)"
    )
    parser.add_argument(
        "--recovery-messages", type=int, default=None, help="spool size (default 100000; quick 10000)"
    )
    parser.add_argument("--probe-interval", type=float, default=0.1, help="seconds between latency probes")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where queues live (default: a new temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--json", type=Path, default=REPO / "bench" / "out" / "results.json", help="raw results"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mailrelay-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)  # Postfix's unprivileged daemons must reach their data directory
    options = Options(
        quick=args.quick,
        repeat=args.repeat or (1 if args.quick else 3),
        workers=args.workers,
        workdir=workdir,
        probe_interval=args.probe_interval,
        sizes=[s.strip() for s in args.sizes.split(",") if s.strip()],
        sessions=[int(s) for s in args.sessions.split(",") if s.strip()],
        queue_depths=[
            int(d) for d in (args.queue_depths or ("2000,10000" if args.quick else "10000,100000")).split(",")
        ],
        recovery_messages=args.recovery_messages or (10000 if args.quick else 100000),
        systems=[s.strip() for s in args.systems.split(",") if s.strip()],
    )
    info = machine()
    info["command"] = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"bench: {info}; work directory {workdir}")
    bench = Bench(options)
    started = time.monotonic()
    try:
        for scenario in scenarios:
            log(f"scenario {scenario}")
            getattr(bench, scenario.replace("-", "_"))()
    finally:
        info["duration_s"] = f"{time.monotonic() - started:.0f}"
        report(info, bench.runs, options, args.json)
        if not args.keep:
            log(f"removing {workdir}")
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
