"""The benchmark's scenarios: what is started, in which order, and which runs are made.

- ``ceiling``: smtp-source straight into smtp-sink, the machine's upper bound for each case;
- ``one-hop``: smtp-source -> relay -> smtp-sink for every size x sessions case: throughput
  runs first (no other traffic), then latency runs (the same load with probes);
- ``chain``: three relays in a row (three MailRelays chained by ``relay`` next hops, three
  Postfix chained by ``relayhost``), 2 KB x 20 sessions, throughput;
- ``variants``: every Postfix variant (bench.postfix_config) side by side, 2 KB at 20 and 1
  sessions, throughput, interleaved; the figures behind the choice of the default variant;
- ``queue``: next hop down, fill with 2 KB messages to each depth (10,000 and 100,000):
  PSS per queued message over the baseline, fill rate and CPU per message at each depth;
- ``recovery``: a mailrelay spool pre-filled by relay.spool's own writer with mail in every
  state (a third each incoming, active and deferred); seconds from process start until every
  replica's ``/readyz`` answers 200.

Within a scenario both systems run at the same time, each idle while the other is measured, and
the order alternates between repeats. Every process started is stopped by pid at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import procs
from bench.load import Probe, Run, load_average, load_run, log, smtp_source, wait_drained
from bench.postfix_config import VARIANTS, variant_from_spec
from bench.sinks import CountingSink, ProbeSink
from bench.systems import (
    Hop,
    MailrelaySet,
    MailrelaySettings,
    Postfix,
    PostfixSettings,
    RelayDef,
    System,
    one_mailrelay,
)

SCENARIOS = ("ceiling", "one-hop", "chain", "variants", "queue", "recovery")
SIZES = {"2KB": 2048, "100KB": 102400}
SESSIONS = (1, 20)
Case = tuple[str, int, int]  # size, sessions, repeat
# messages per run (full); --quick divides by 5
MESSAGES = {
    ("2KB", 1): 3000,
    ("2KB", 20): 10000,
    ("2KB", 50): 10000,
    ("100KB", 1): 1500,
    ("100KB", 20): 3000,
    ("100KB", 50): 3000,
}
CHAIN_MESSAGES = 4000
VARIANT_CASES = (("2KB", 20), ("2KB", 1), ("100KB", 20))


@dataclass
class Options:
    quick: bool
    repeat: int
    workdir: Path
    probe_interval: float
    sizes: list[str]
    sessions: list[int]
    queue_depths: list[int]
    recovery_messages: int
    systems: list[str]
    postfix: PostfixSettings
    mailrelay: MailrelaySettings
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    latency: bool = True


class _Group:
    """Several systems measured as one (a Postfix chain): entry port of the first."""

    def __init__(self, name: str, members: list[System]) -> None:
        self.name = name
        self.members = members
        self.port = members[0].port

    def start(self) -> None:
        for member in reversed(self.members):
            member.start()

    def stop(self) -> None:
        for member in self.members:
            with contextlib.suppress(Exception):
                member.stop()

    def pids(self) -> list[int]:
        return [pid for member in self.members for pid in member.pids()]

    def queued(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for member in self.members:
            for key, value in member.queued().items():
                total[key] = total.get(key, 0) + value
        return total

    def warnings(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for member in self.members:
            for line, count in getattr(member, "warnings", dict)().items():
                found[line] = found.get(line, 0) + count
        return found


class Bench:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.runs: list[Run] = []
        self.notes: dict[str, Any] = {}

    # -- helpers

    @contextlib.contextmanager
    def started(self, thing: Any) -> Iterator[Any]:
        thing.start()
        try:
            yield thing
        finally:
            with contextlib.suppress(Exception):
                thing.stop()

    @contextlib.contextmanager
    def systems(self, factory: Callable[[str], System], sink: CountingSink) -> Iterator[dict[str, System]]:
        """Every system of `self.o.systems`, started and warmed up, stopped at the end."""
        running: dict[str, System] = {}
        try:
            for kind in self.o.systems:
                running[kind] = factory(kind)
                running[kind].start()
                self.warm(running[kind], sink)
            yield running
        finally:
            for kind, system in running.items():
                self.record_warnings(kind, system)
                with contextlib.suppress(Exception):
                    system.stop()

    def record_warnings(self, label: str, system: Any) -> None:
        warnings = getattr(system, "warnings", None)
        if warnings is None:
            return
        found = warnings()
        if found:
            self.notes.setdefault("postfix_warnings", {})[f"{system.name}"] = found
            log(f"{label} {system.name} logged warnings: {list(found.items())[:5]}")

    def messages(self, size: str, sessions: int) -> int:
        count = MESSAGES.get((size, sessions), 10000 if size == "2KB" else 2000)
        return max(100, count // 5) if self.o.quick else count

    def order(self, repeat: int, kinds: list[str] | None = None) -> list[str]:
        systems = list(kinds if kinds is not None else self.o.systems)
        shift = repeat % len(systems) if systems else 0
        return systems[shift:] + systems[:shift]

    def postfix(
        self, name: str, next_hop: Hop, probe: Hop | None, settings: PostfixSettings | None = None
    ) -> Postfix:
        return Postfix(name, self.o.workdir, next_hop, probe, settings or self.o.postfix)

    def make(self, kind: str, name: str, next_hop: Hop, probe: Hop | None) -> System:
        if kind == "postfix":
            return self.postfix(name, next_hop, probe)
        return one_mailrelay(name, self.o.workdir, next_hop, probe, self.o.mailrelay)

    def launcher(self, system: System) -> list[int] | None:
        if isinstance(system, MailrelaySet):
            return system.launcher_pids() or None
        return None

    def warm(self, system: System, sink: CountingSink) -> None:
        base = sink.count
        smtp_source(system.port, 2048, 20, 200, 120)
        sink.wait_for(base + 200, timeout=60)
        wait_drained(system)

    def cases(self) -> list[tuple[str, int]]:
        return [(size, s) for size in self.o.sizes for s in self.o.sessions]

    def _load(
        self, scenario: str, label: str, system: System | None, sink: CountingSink, case: Case, **given: Any
    ) -> None:
        """One load run of `case` (size, sessions, repeat) through `system` (None: straight into
        the sink), logged and kept. `given`: ``name`` (of the case), ``messages`` (the case's
        count when not given), ``probe``."""
        size, sessions, repeat = case
        run = load_run(
            scenario,
            given.get("name") or f"{size} x{sessions}",
            label,
            system,
            sink.port if system is None else system.port,
            sink,
            SIZES[size],
            sessions,
            given.get("messages") or self.messages(size, sessions),
            repeat,
            probe=given.get("probe"),
            launcher=None if system is None else self.launcher(system),
        )
        self._log_run(run)

    def _log_run(self, run: Run) -> None:
        latency = (
            f" p50 {run.p50_ms} ms p99 {run.p99_ms} ms ({run.probes} probes)" if run.kind == "latency" else ""
        )
        log(
            f"{run.scenario} {run.case} {run.system} [{run.kind}]: {run.rate} msg/s, "
            f"cpu {run.cpu_ms_per_msg} ms/msg{latency}, load {run.load_before:.2f}"
        )
        self.runs.append(run)

    # -- ceiling and one hop

    def ceiling(self) -> None:
        with self.started(CountingSink()) as sink:
            for repeat in range(self.o.repeat):
                for size, sessions in self.cases():
                    self._load("ceiling", "direct", None, sink, (size, sessions, repeat))

    def one_hop(self) -> None:
        with self.started(CountingSink()) as sink, self.started(ProbeSink()) as probe_sink:
            hop, probe_hop = Hop("127.0.0.1", sink.port), Hop("127.0.0.1", probe_sink.port)

            def factory(kind: str) -> System:
                return self.make(kind, f"{kind}-1hop", hop, probe_hop)

            with self.systems(factory, sink) as systems:
                for system in systems.values():
                    if isinstance(system, MailrelaySet):
                        self.notes["mailrelay_config"] = system.config_text()
                passes: list[Probe | None] = [None]
                if self.o.latency:
                    passes.append(Probe(probe_sink, self.o.probe_interval))
                for probe in passes:
                    for repeat in range(self.o.repeat):
                        for size, sessions in self.cases():
                            for kind in self.order(repeat):
                                case = (size, sessions, repeat)
                                self._load("one-hop", kind, systems[kind], sink, case, probe=probe)

    def chain(self) -> None:
        size, sessions = "2KB", 20
        messages = max(200, CHAIN_MESSAGES // 5) if self.o.quick else CHAIN_MESSAGES
        with self.started(CountingSink()) as sink:
            hop = Hop("127.0.0.1", sink.port)

            def factory(kind: str) -> System:
                if kind == "postfix":
                    last = self.postfix("postfix-c3", hop, None)
                    middle = self.postfix("postfix-c2", Hop("127.0.0.1", last.port), None)
                    first = self.postfix("postfix-c1", Hop("127.0.0.1", middle.port), None)
                    return _Group("postfix-chain", [first, middle, last])
                names = ["mailrelay-c1", "mailrelay-c2", "mailrelay-c3"]
                relays = [
                    RelayDef(names[0], procs.free_port(), names[1]),
                    RelayDef(names[1], procs.free_port(), names[2]),
                    RelayDef(names[2], procs.free_port(), hop),
                ]
                return MailrelaySet("mailrelay-chain", self.o.workdir, relays, self.o.mailrelay)

            with self.systems(factory, sink) as systems:
                for repeat in range(self.o.repeat):
                    for kind in self.order(repeat):
                        case = (size, sessions, repeat)
                        name = f"{size} x{sessions} 3 hops"
                        self._load("chain", kind, systems[kind], sink, case, name=name, messages=messages)

    # -- Postfix variants

    def variants(self) -> None:
        if "postfix" not in self.o.systems:
            return
        with self.started(CountingSink()) as sink:
            hop = Hop("127.0.0.1", sink.port)
            running: dict[str, Postfix] = {}
            try:
                described: dict[str, str] = {}
                for number, name in enumerate(self.o.variants):
                    variant = variant_from_spec(name)
                    settings = replace(self.o.postfix, variant=variant)
                    running[name] = self.postfix(f"postfix-v{number}", hop, None, settings)
                    running[name].start()
                    self.warm(running[name], sink)
                    described[name] = variant.describe()
                self.notes["variants"] = described
                for repeat in range(self.o.repeat):
                    for size, sessions in VARIANT_CASES:
                        for name in self.order(repeat, list(running)):
                            self._load("variants", name, running[name], sink, (size, sessions, repeat))
            finally:
                for system in running.values():
                    self.record_warnings("variant", system)
                    with contextlib.suppress(Exception):
                        system.stop()

    # -- queue depth and recovery

    def queue(self) -> None:
        dead = Hop("127.0.0.1", procs.free_port())  # nothing listens there: every attempt fails
        for kind in self.o.systems:
            system = self.make(kind, f"{kind}-queue", dead, None)
            system.start()
            try:
                self._fill(kind, system)
            finally:
                self.record_warnings(kind, system)
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
            load_before = load_average()
            cpu0 = procs.cpu_seconds(roots)
            started = time.monotonic()
            ok, output = smtp_source(system.port, 2048, 20, chunk, 600 + chunk / 20)
            accepted = time.monotonic() - started
            if not ok:
                log(f"warning: queue fill {kind}: {output}")
            settled = self._settle(system, target)
            settle_seconds = time.monotonic() - started
            cpu = procs.cpu_seconds(roots) - cpu0
            time.sleep(6.0)  # past one rescan of the queue (5 s) before reading memory
            pss = procs.pss_bytes(roots)
            depth = target
            run = Run(
                scenario="queue",
                case=f"{target} deferred",
                system=kind,
                repeat=0,
                kind="queue",
                messages=chunk,
                seconds=round(settle_seconds, 2),
                rate=round(chunk / settle_seconds, 1),
                accept_rate=round(chunk / accepted, 1),
                cpu_ms_per_msg=round(1000 * cpu / chunk, 3),
                peak_pss_mb=round(pss / 2**20, 1),
                complete=ok and settled,
                load_before=load_before,
                extra={
                    "depth": target,
                    "pss_baseline_mb": round(baseline / 2**20, 1),
                    "bytes_per_queued_msg": round((pss - baseline) / target, 1),
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
        settings = replace(self.o.mailrelay, launch="relay")  # the relay's own start, not up's
        system = one_mailrelay(
            "mailrelay-recovery", self.o.workdir, Hop("127.0.0.1", procs.free_port()), None, settings
        )
        spool = system.spool_dir()
        case = f"{count} queued (incoming, active, deferred)"
        for repeat in range(self.o.repeat):
            shutil.rmtree(spool, ignore_errors=True)
            started = time.monotonic()
            states = prefill_spool(spool, count)
            log(f"recovery: wrote {states} with the spool's writer in {time.monotonic() - started:.1f}s")
            load_before = load_average()
            system.start(wait=False)
            try:
                ready = system.wait_ready(timeout=600)
                pss = procs.pss_bytes(system.pids())
            finally:
                system.stop()
            run = Run(
                scenario="recovery",
                case=case,
                system="mailrelay",
                repeat=repeat,
                kind="recovery",
                messages=count,
                seconds=round(ready, 3),
                rate=round(count / ready, 1),
                accept_rate=0.0,
                peak_pss_mb=round(pss / 2**20, 1),
                load_before=load_before,
                extra={"prefilled": states, "queued_after": system.queued()},
            )
            log(f"recovery {count}: ready after {ready:.2f}s, PSS {run.peak_pss_mb} MB")
            self.runs.append(run)


def prefill_spool(directory: Path, count: int) -> dict[str, int]:
    """`count` 2 KB messages written by relay.spool itself, a third in each state a crashed
    relay leaves: incoming/ (accepted, never attempted), active/ (claimed when it stopped) and
    deferred/ (attempted once, next attempt in an hour)."""
    from relay.core.model import Envelope, QueueEntry, Recipient
    from relay.spool import Spool, new_queue_id

    spool = Spool(directory, fsync=False)
    spool.prepare()
    body = (b"x" * 76 + b"\r\n") * 26
    now = time.time()
    states = ("incoming", "active", "deferred")
    written = dict.fromkeys(states, 0)
    try:
        for number in range(count):
            state = states[number % 3]
            queue_id = new_queue_id()
            content = (
                f"Subject: prefill {number}\r\nMessage-Id: <{queue_id}@bench.test>\r\n\r\n".encode() + body
            )
            recipient = Recipient(f"user{number}@dest.test")
            deferred = state == "deferred"
            entry = QueueEntry(
                queue_id=queue_id,
                envelope=Envelope("source@bench.test", (recipient,)),
                arrival=now,
                pending=(recipient,),
                attempts=1 if deferred else 0,
                next_attempt=now + 3600 if deferred else now,
                client_address="127.0.0.1",
                helo="source.bench.test",
                size=len(content),
            )
            # the spool's own writer (its commit path), straight into the state's directory
            mtime = entry.next_attempt if deferred else None
            spool._commit(entry, content, (str(spool.path(state, queue_id)),), mtime)
            written[state] += 1
    finally:
        spool.close()
    os.sync()
    return written
