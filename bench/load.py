"""One measured run: ``smtp-source`` load into a relay, arrivals counted at the sink.

Two kinds of run, never mixed:
- **throughput** (`load_run` without a probe): messages per second counted at the sink, relay
  CPU (utime + stime of every relay process, bench.procs) per message, peak PSS; no other
  traffic;
- **latency** (`load_run` with a probe): the same load, plus one probe message at a time over
  its own session (bench.sinks); only the probes' latencies are the figures of such a run.

What it must not do: decide anything about what is run (bench.scenarios does).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from bench import procs
from bench.sinks import CountingSink, ProbeSender, ProbeSink, latencies
from bench.summary import percentile
from bench.systems import System


@dataclass
class Run:
    scenario: str
    case: str
    system: str
    repeat: int
    kind: Literal["throughput", "latency", "queue", "recovery"]
    messages: int
    seconds: float
    rate: float  # messages/s counted at the sink
    accept_rate: float  # messages/s as smtp-source saw them accepted
    p50_ms: float | None = None
    p99_ms: float | None = None
    probes: int = 0
    probes_lost: int = 0
    cpu_ms_per_msg: float | None = None
    peak_pss_mb: float | None = None
    complete: bool = True
    load_before: float = 0.0  # 1-minute load average just before the run
    extra: dict[str, Any] = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def add_load_options(parser: argparse.ArgumentParser, *, messages: int) -> None:
    """--size, --sessions, --messages and --workers: the load one relay gets (bench.cpu, bench.profile)."""
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=messages)
    parser.add_argument("--workers", type=int, default=None, help="spec.workers (default: the spec's auto)")


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


def wait_drained(system: System | None, timeout: float = 120.0) -> bool:
    if system is None:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(system.queued().values()):
            return True
        time.sleep(0.1)
    log(f"warning: {system.name} still has mail queued: {system.queued()}")
    return False


@dataclass(frozen=True)
class Probe:
    """The latency probe of a latency run: the sink it arrives at, and the send interval."""

    sink: ProbeSink
    interval: float


def load_run(
    scenario: str,
    case: str,
    label: str,
    system: System | None,
    entry_port: int,
    sink: CountingSink,
    size: int,
    sessions: int,
    messages: int,
    repeat: int,
    probe: Probe | None = None,
    launcher: list[int] | None = None,
) -> Run:
    """smtp-source -> entry_port; count `messages` arrivals at `sink`. With `probe`, a latency
    run: probes go in meanwhile and their latencies are the run's figures. `launcher` pids
    (``mailrelay up``'s supervisor) are measured apart from the relay's CPU."""
    roots = system.pids() if system is not None else []
    load_before = load_average()
    base = sink.count
    sampler = procs.PeakSampler(roots).__enter__()
    cpu_before = procs.cpu_seconds(roots)
    launcher_before = procs.own_cpu_seconds(launcher or [])
    sender = None
    if probe is not None:
        tag = f"{label}-{case}-{repeat}".replace(" ", "")
        sender = ProbeSender("127.0.0.1", entry_port, size, probe.interval, tag)
        sender.start()
    timeout = 120 + messages / 10
    started = time.monotonic()
    ok, output = smtp_source(entry_port, size, sessions, messages, timeout)
    accepted_at = time.monotonic()
    if not ok:
        log(f"warning: smtp-source against {label}: {output}")
    complete = sink.wait_for(base + messages, timeout=timeout)
    arrived = min(sink.count - base, messages)
    finished = sink.arrival(base + arrived) if arrived else time.monotonic()
    lat: list[float] = []
    lost = 0
    if sender is not None and probe is not None:
        sender.stop()
        lat, lost = latencies(sender, probe.sink)
    drained = wait_drained(system)
    cpu = procs.cpu_seconds(roots) - cpu_before if roots else None
    launcher_cpu = procs.own_cpu_seconds(launcher or []) - launcher_before
    sampler.__exit__(None, None, None)
    seconds = max(finished - started, 1e-9)
    # relay CPU per message: over the whole run (until drained), divided by what it carried
    handled = arrived + len(lat)
    extra: dict[str, Any] = {}
    if launcher:
        extra["launcher_cpu_ms_per_msg"] = round(1000 * launcher_cpu / max(handled, 1), 3)
    if not drained:
        extra["not_drained"] = True
    if lat:
        extra["latencies_ms"] = [round(1000 * value, 1) for value in lat]
    return Run(
        scenario=scenario,
        case=case,
        system=label,
        repeat=repeat,
        kind="latency" if probe is not None else "throughput",
        messages=arrived,
        seconds=round(seconds, 3),
        rate=round(arrived / seconds, 1),
        accept_rate=round(messages / max(accepted_at - started, 1e-9), 1),
        p50_ms=None if not lat else round(1000 * (percentile(lat, 0.5) or 0), 1),
        p99_ms=None if not lat else round(1000 * (percentile(lat, 0.99) or 0), 1),
        probes=len(lat),
        probes_lost=lost,
        cpu_ms_per_msg=None if cpu is None or not handled else round(1000 * cpu / handled, 3),
        peak_pss_mb=None if not roots else round(sampler.peak / 2**20, 1),
        complete=complete and ok,
        load_before=load_before,
        extra=extra,
    )
