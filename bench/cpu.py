"""``python -m bench.cpu``: relay CPU per message, and where it goes, for one load case.

Throughput needs a quiet machine; CPU time per message much less so. This runs mailrelay from
the benchmark's default manifests (``workers: auto``), sends a fixed number of messages with
``smtp-source`` and reads the relay processes' CPU (utime and stime from /proc, every worker
and every thread) from the first byte of load until the spool is empty::

    .venv/bin/python -m bench.cpu --size 2048 --sessions 20 --messages 6000 --repeat 3
    .venv/bin/python -m bench.cpu --trees base=/tmp/base,new=. --repeat 5   # interleaved A/B
    .venv/bin/python -m bench.cpu --profile                                 # + py-spy stages

``--trees NAME=DIR,...`` runs the relay from each source tree in turn (its ``PYTHONPATH``),
alternating the order between repeats, so two versions are compared in the same conditions.
``--profile`` adds a py-spy recording of every worker during each run (never in the runs whose
CPU is compared: py-spy costs the relay time) and splits the samples into the stages of
`STAGES`: the share of samples times the measured CPU per message gives milliseconds per stage.

Output: one line per run, then per tree the median CPU ms/msg (user, system, event-loop
thread, other threads), and with ``--profile`` the stage table. ``--json FILE`` keeps it all.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import procs
from bench.load import add_load_options, smtp_source
from bench.sinks import CountingSink
from bench.systems import REPO, Hop, MailrelaySettings, one_mailrelay

# (stage, path fragment of a frame's file, function name or "" for any). A stack belongs to
# the stage of the first frame, from the leaf up, that matches a rule (the first matching rule
# of that frame); frames of TRANSPARENT modules (values both sides use) count for their caller;
# no match: "other".
TRANSPARENT = (
    "relay/core/model.py",
    "relay/core/status.py",
    "relay/core/addresses.py",
    "asyncio/streams.py",  # a stream read or write counts for its reader: intake or delivery
    "asyncio/locks.py",
    "asyncio/tasks.py",
    "asyncio/timeouts.py",
)
STAGES: tuple[tuple[str, str, str], ...] = (
    ("logging", "logging/", ""),
    ("logging", "relay/app.py", "formatTime"),
    ("logging", "relay/logs.py", ""),
    ("rate limits (relay.throttle)", "relay/throttle.py", ""),
    ("DKIM signing", "relay/dkim.py", ""),
    ("metrics", "prometheus_client/", ""),
    ("spool write+fsync", "relay/durable.py", ""),
    ("spool write+fsync", "relay/spool.py", "_store"),
    ("spool write+fsync", "relay/spool.py", "_commit"),
    ("spool write+fsync", "relay/spool.py", "encode"),
    ("spool write+fsync", "relay/spool.py", "encode_parts"),
    ("spool write+fsync", "relay/spool.py", "store"),
    ("spool claim/read/unlink", "relay/spool.py", ""),
    ("hand-off (threads, doorbell, dispatch)", "concurrent/futures/", ""),
    ("hand-off (threads, doorbell, dispatch)", "relay/doorbell.py", ""),
    ("hand-off (threads, doorbell, dispatch)", "relay/dispatch.py", ""),
    ("hand-off (threads, doorbell, dispatch)", "threading.py", ""),
    ("delivery client", "relay/smtp_client.py", ""),
    ("delivery client", "relay/smtp_transaction.py", ""),
    ("delivery client", "relay/smtp_pool.py", ""),
    ("delivery client", "relay/delivery.py", ""),
    ("delivery client", "relay/hops.py", ""),
    ("delivery client", "relay/core/smtp_payload.py", ""),
    ("intake: DATA decoding", "relay/core/smtp_data.py", ""),
    ("intake: message checks, trace, queue entry", "relay/core/accept.py", ""),
    ("intake: message checks, trace, queue entry", "relay/core/received.py", ""),
    ("intake: message checks, trace, queue entry", "relay/core/headers.py", ""),
    ("intake: commands", "relay/core/smtp_syntax.py", ""),
    ("intake: commands", "relay/core/rcpt.py", ""),
    ("intake: commands", "relay/front_session.py", ""),
    ("intake: commands", "relay/smtpd.py", ""),
    ("intake: commands", "relay/front.py", ""),
    ("intake: commands", "aiosmtpd/", ""),
    ("scheduler", "relay/scheduler.py", ""),
    ("scheduler", "relay/scan.py", ""),
    ("scheduler", "relay/core/", ""),  # settle, routing, outcome, policy, dsn (not TRANSPARENT)
    ("event loop, streams, sockets", "asyncio/", ""),
    ("event loop, streams, sockets", "uvloop/", ""),
)


def stage_of(frames: list[str]) -> str:
    """The stage of one collapsed py-spy stack (root first, as py-spy writes it)."""
    for frame in reversed(frames):
        # "function (path/file.py:line)"
        name, _, where = frame.partition(" (")
        if any(fragment in where for fragment in TRANSPARENT):
            continue
        for stage, fragment, function in STAGES:
            if fragment in where and (not function or name == function):
                return stage
    return "other"


def stages(files: list[Path]) -> collections.Counter[str]:
    """Samples per "loop/<stage>" (main threads) and "pool/<stage>" (every other thread)."""
    counts: collections.Counter[str] = collections.Counter()
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            kind = "pool" if frames[0].startswith("Thread._bootstrap") else "loop"
            counts[f"{kind}/{stage_of(frames)}"] += int(count)
    return counts


_SYSCALLS = (
    ("fsync", "fsync"),
    ("sendto", "socket send"),
    ("write", "write (socket send or file write)"),
    ("writev", "socket send"),
    ("recvfrom", "socket receive"),
    ("read", "read (socket receive or file read)"),
    ("rename", "rename"),
    ("unlink", "unlink"),
    ("openat", "open"),
    ("close", "close"),
    ("futex", "futex (thread wake-ups)"),
    ("epoll_wait", "epoll"),
    ("epoll_ctl", "epoll"),
)


def perf_stages(data: Path) -> collections.Counter[str]:
    """Samples of a ``perf record -g`` by what ran: the system call a kernel sample is in,
    or the user-space library."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym,dso"], capture_output=True, text=True, check=False
    ).stdout
    counts: collections.Counter[str] = collections.Counter()
    for block in out.split("\n\n"):
        frames = [
            line.split(None, 1)[1] if " " in line.strip() else line for line in block.strip().splitlines()
        ]
        if not frames:
            continue
        leaf = frames[0]
        if "[kernel.kallsyms]" not in leaf:
            dso = leaf.rsplit("(", 1)[-1].rstrip(")")
            counts[f"user/{Path(dso).name}"] += 1
            continue
        label = "kernel/other (interrupts, scheduler)"
        for frame in frames:
            if "__x64_sys_" in frame or "__do_sys_" in frame or "__se_sys_" in frame:
                call = frame.split("sys_", 1)[1].split()[0].split("+")[0]
                label = "kernel/" + next((name for key, name in _SYSCALLS if call == key), call)
                break
        counts[label] += 1
    return counts


def _thread_ticks(pid: int) -> dict[int, tuple[int, int]]:
    """utime, stime (clock ticks) per live thread of `pid`."""
    ticks = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            data = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        ticks[int(tid)] = (int(fields[11]), int(fields[12]))
    return ticks


@dataclass
class Reading:
    user: float = 0.0  # seconds, whole tree
    system: float = 0.0
    loop: float = 0.0  # the main (event-loop) thread of every process
    threads: float = 0.0  # every other thread (spool pool, to_thread)


def read_cpu(root: int) -> Reading:
    reading = Reading()
    for pid in procs.tree([root]):
        for tid, (user, system) in _thread_ticks(pid).items():
            reading.user += user / procs.CLOCK_TICKS
            reading.system += system / procs.CLOCK_TICKS
            if tid == pid:
                reading.loop += (user + system) / procs.CLOCK_TICKS
            else:
                reading.threads += (user + system) / procs.CLOCK_TICKS
    return reading


@dataclass
class Run:
    tree: str
    repeat: int
    messages: int
    seconds: float
    cpu_ms: float
    user_ms: float
    system_ms: float
    loop_ms: float
    threads_ms: float
    load: float
    complete: bool
    profile: dict[str, int] = field(default_factory=dict)


def one_run(args: argparse.Namespace, name: str, tree: Path, repeat: int, profile: bool) -> Run:
    os.environ["PYTHONPATH"] = f"{tree}:{tree / 'operator'}"
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-cpu-"))
    os.chmod(workdir, 0o755)
    sink = CountingSink()
    sink.start()
    settings = MailrelaySettings(overrides={} if args.workers is None else {"workers": args.workers})
    relay = one_mailrelay("cpu", workdir, Hop("127.0.0.1", sink.port), None, settings)
    recorders: list[subprocess.Popen[bytes]] = []
    files: list[Path] = []
    try:
        relay.start()
        root = relay.pids()[0]
        # warm up: connections to the sink, imports, caches
        smtp_source(relay.port, args.size, min(args.sessions, 5), 200, 120)
        sink.wait_for(200, timeout=60)
        while any(relay.queued().values()):
            time.sleep(0.05)
        time.sleep(0.3)
        load = os.getloadavg()[0]
        before = read_cpu(root)
        started = time.monotonic()
        if args.perf and not profile:
            pids = ",".join(str(pid) for pid in procs.tree([root]))
            perf_data = Path(workdir) / "perf.data"
            recorders.append(
                subprocess.Popen(
                    [
                        "perf",
                        "record",
                        "-e",
                        "cpu-clock",
                        "-F",
                        "1999",
                        "-g",
                        "-p",
                        pids,
                        "-o",
                        str(perf_data),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(1.0)
            before = read_cpu(root)
            started = time.monotonic()
        if profile:
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            out = Path(workdir) / "spy"
            out.mkdir()
            for pid in procs.tree([root]):
                path = out / f"{pid}.txt"
                files.append(path)
                command = [
                    pyspy,
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    "200",
                    "-d",
                    "600",
                    "-f",
                    "raw",
                    "--gil",
                    "-o",
                    str(path),
                ]
                recorders.append(
                    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            time.sleep(1.0)  # py-spy attaches
            before = read_cpu(root)
            started = time.monotonic()
        target = 200 + args.messages
        loader = threading.Thread(
            target=smtp_source, args=(relay.port, args.size, args.sessions, args.messages, 900), daemon=True
        )
        loader.start()
        complete = sink.wait_for(target, timeout=900)
        while any(relay.queued().values()) and time.monotonic() - started < 900:
            time.sleep(0.02)
        seconds = time.monotonic() - started
        after = read_cpu(root)
        loader.join(timeout=60)
        for recorder in recorders:
            recorder.send_signal(2)  # SIGINT: py-spy writes what it has
        for recorder in recorders:
            recorder.wait(timeout=60)
        kept = REPO / "bench" / "out"
        if files:
            kept.mkdir(parents=True, exist_ok=True)
        for path in files:
            if path.exists():
                shutil.copy(path, kept / f"cpu-{name}-{path.name}")
        counts = stages([f for f in files if f.exists()]) if profile else collections.Counter()
        if args.perf and not profile:
            counts = perf_stages(Path(workdir) / "perf.data")
            shutil.copy(Path(workdir) / "perf.data", kept / f"perf-{name}-{repeat}.data")
        per = 1000.0 / args.messages
        return Run(
            tree=name,
            repeat=repeat,
            messages=args.messages,
            seconds=round(seconds, 2),
            cpu_ms=round((after.user + after.system - before.user - before.system) * per, 3),
            user_ms=round((after.user - before.user) * per, 3),
            system_ms=round((after.system - before.system) * per, 3),
            loop_ms=round((after.loop - before.loop) * per, 3),
            threads_ms=round((after.threads - before.threads) * per, 3),
            load=load,
            complete=complete,
            profile=dict(counts),
        )
    finally:
        for recorder in recorders:
            if recorder.poll() is None:
                recorder.kill()
        relay.stop()
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def breakdown(profiled: list[Run], loop_ms: float, threads_ms: float) -> list[str]:
    """CPU ms per message by stage. py-spy samples only the thread holding the GIL (``--gil``):
    the main threads' samples split `loop_ms` (the event-loop threads' measured CPU, which they
    spend holding the GIL but for their short waits); a sample is worth that many ms, and the
    other threads' samples (Python in the spool's pool) count at the same rate; the rest of
    `threads_ms` is their system calls with the GIL released (write, rename, fsync, unlink)."""
    total: collections.Counter[str] = collections.Counter()
    for r in profiled:
        total.update(r.profile)
    loop_samples = sum(n for key, n in total.items() if key.startswith("loop/"))
    per_sample = loop_ms / max(loop_samples, 1)
    rows: collections.Counter[str] = collections.Counter()
    pool_python = 0.0
    for key, n in total.items():
        kind, _, stage = key.partition("/")
        ms = n * per_sample
        if kind == "pool":
            pool_python += ms
            stage = f"{stage} (spool threads, Python)"
        rows[stage] += ms
    rows["spool threads: system calls, GIL released (write, rename, fsync, unlink, read)"] += max(
        threads_ms - pool_python, 0.0
    )
    whole = sum(rows.values())
    lines = [f"  stages ({sum(total.values())} py-spy --gil samples over {len(profiled)} run(s); ms/msg)"]
    for stage, ms in sorted(rows.items(), key=lambda item: -item[1]):
        lines.append(f"    {stage:<86} {ms:6.3f}  {100 * ms / max(whole, 1e-9):5.1f}%")
    return lines


def perf_breakdown(runs: list[Run], cpu_ms: float) -> list[str]:
    total: collections.Counter[str] = collections.Counter()
    for r in runs:
        total.update(r.profile)
    samples = sum(total.values())
    lines = [f"  perf ({samples} samples over {len(runs)} run(s); share x {cpu_ms:.3f} ms/msg)"]
    for key, n in total.most_common(25):
        lines.append(f"    {key:<60} {100 * n / samples:5.1f}%  {cpu_ms * n / samples:.3f} ms")
    return lines


def report(runs: list[Run]) -> str:
    lines = []
    by_tree: dict[str, list[Run]] = collections.defaultdict(list)
    for run in runs:
        by_tree[run.tree].append(run)
    lines.append("tree        runs  CPU ms/msg (median; all)          user  system  loop  threads")
    for tree, all_runs in by_tree.items():
        group = [r for r in all_runs if not r.profile] or all_runs

        def med(attr: str, group: list[Run] = group) -> float:
            return statistics.median(getattr(r, attr) for r in group)

        all_cpu = ", ".join(f"{r.cpu_ms:.3f}" for r in group)
        lines.append(
            f"{tree:<10} {len(group):>5}  {med('cpu_ms'):.3f} ({all_cpu})"
            f"  {med('user_ms'):.3f}  {med('system_ms'):.3f}  {med('loop_ms'):.3f}  {med('threads_ms'):.3f}"
        )
        perfed = [r for r in group if r.profile]
        if perfed:
            lines += perf_breakdown(perfed, med("cpu_ms"))
        profiled = [r for r in all_runs if r.profile and r not in group]
        if profiled:
            lines += breakdown(profiled, med("loop_ms"), med("threads_ms"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu")
    add_load_options(parser, messages=6000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--trees", default=f"this={REPO}", help="NAME=DIR,... source trees to compare")
    parser.add_argument("--profile", action="store_true", help="py-spy every worker (separate runs)")
    parser.add_argument("--perf", action="store_true", help="perf record the timed runs (kernel/user split)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    trees = [
        (name, Path(path).resolve()) for name, _, path in (t.partition("=") for t in args.trees.split(","))
    ]
    runs: list[Run] = []
    for repeat in range(args.repeat):
        order = trees if repeat % 2 == 0 else list(reversed(trees))
        for name, tree in order:
            run = one_run(args, name, tree, repeat, profile=False)
            runs.append(run)
            print(json.dumps(asdict(run)), flush=True)
    if args.profile:
        for name, tree in trees:
            run = one_run(args, name, tree, args.repeat, profile=True)
            runs.append(run)
            print(json.dumps({k: v for k, v in asdict(run).items() if k != "profile"}), flush=True)
    text = report(runs)
    print(text)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "runs": [asdict(r) for r in runs]}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
