"""``python -m bench.profile``: run mailrelay under smtp-source load and record every worker with
py-spy (``pip install py-spy``), writing collapsed stacks and a summary of the hottest frames.

    .venv/bin/python -m bench.profile --size 2048 --sessions 20 --messages 20000 --seconds 20

Output: ``bench/out/profile-<pid>.txt`` (collapsed stacks, one line per stack with its sample
count, for flamegraph tools) and, on stdout, the functions with the most samples (self and
inclusive) over all workers.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import procs
from bench.load import add_load_options, smtp_source
from bench.sinks import CountingSink
from bench.systems import REPO, Hop, MailrelaySettings, one_mailrelay


def summarize(files: list[Path], top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            samples = int(count)
            frames = stack.split(";")
            total += samples
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
    lines = [f"{total} samples"]
    lines.append("-- self --")
    lines += [f"{100 * n / max(total, 1):5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("-- inclusive --")
    lines += [f"{100 * n / max(total, 1):5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    add_load_options(parser, messages=20000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--idle", action="store_true", help="py-spy --idle (include waiting threads)")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-profile-"))
    os.chmod(workdir, 0o755)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    sink = CountingSink()
    sink.start()
    settings = MailrelaySettings(overrides={} if args.workers is None else {"workers": args.workers})
    relay = one_mailrelay("profiled", workdir, Hop("127.0.0.1", sink.port), None, settings)
    try:
        relay.start()
        root = relay.pids()[0]
        workers = [pid for pid in procs.tree([root]) if pid != root] or [root]
        load = threading.Thread(
            target=smtp_source, args=(relay.port, args.size, args.sessions, args.messages, 600), daemon=True
        )
        load.start()
        files = []
        recorders = []
        for pid in workers:
            path = out / f"profile-{pid}.txt"
            files.append(path)
            command = [pyspy, "record", "-p", str(pid), "-d", str(args.seconds), "-f", "raw", "-o", str(path)]
            if args.idle:
                command.append("--idle")
            else:
                command.append("--gil")  # only the thread holding the GIL: Python CPU time
            recorders.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for recorder in recorders:
            recorder.wait()
        print(f"arrived at the sink so far: {sink.count}")
        print(summarize([f for f in files if f.exists()], args.top))
        load.join(timeout=600)
    finally:
        relay.stop()
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
