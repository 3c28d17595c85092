"""``python -m bench.run``: mailrelay side by side with Postfix on this machine (bench/README.md).

Both systems as their users get them: mailrelay from MailRelay manifests with the spec's
defaults, rendered by ``mailrelay up``'s planner; Postfix in its best measured variant
(bench.postfix_config). Levelled: the same delivery concurrency per destination, the same
retry schedule, both durable. Scenarios (``--scenarios``, default all): see bench.scenarios.

Every figure is the median over ``--repeat`` interleaved runs. The raw results (every run, the
commit measured, the settings) go to ``bench/results/<commit>-<timestamp>.json``; the output
ends with every target of issue 13 and whether it is met (bench.targets).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import procs, summary, targets
from bench.load import log
from bench.manifests import Hop, RelayDef
from bench.postfix_config import (
    DEFAULT_VARIANT,
    SHIPPED_DESTINATION_CONCURRENCY,
    SHIPPED_MAXIMAL_BACKOFF,
    SHIPPED_MINIMAL_BACKOFF,
    VARIANTS,
    variant_from_spec,
)
from bench.scenarios import SCENARIOS, SESSIONS, SIZES, Bench, Options
from bench.systems import REPO, MailrelaySet, MailrelaySettings, PostfixSettings, postfix_version

RESULTS = REPO / "bench" / "results"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False).stdout


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    # what the measured code is: the commit, and any uncommitted change to it
    dirty = [
        line[3:]
        for line in _git(
            "status", "--porcelain", "--", "relay", "operator", "bench", "pyproject.toml"
        ).splitlines()
        if line[3:] and not line[3:].startswith("bench/results/")
    ]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix_version(),
        "commit": _git("rev-parse", "--short", "HEAD").strip(),
        "commit_full": _git("rev-parse", "HEAD").strip(),
        "dirty": dirty,
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def _assignments(values: list[str], what: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"{what}: expected KEY=VALUE, got {item!r}")
        parsed[key.strip()] = yaml.safe_load(value) if what == "--mailrelay-set" else value.strip()
    return parsed


def mailrelay_settings_info(settings: MailrelaySettings, workdir: Path) -> dict[str, Any]:
    """What the mailrelay under test really runs with: a config rendered as the scenarios
    render theirs, read back."""
    sample = MailrelaySet(
        "settings", workdir, [RelayDef("settings", procs.free_port(), Hop("127.0.0.1", 9))], settings
    )
    config = yaml.safe_load(sample.config_text())
    shutil.rmtree(sample.dir, ignore_errors=True)
    retry = config["queue"]["retry"]
    return {
        "mailrelay_launch": "`mailrelay up`" if settings.launch == "up" else "`mailrelay relay`",
        "mailrelay_workers_spec": config["workers"],
        "mailrelay_workers": settings.workers(),
        "mailrelay_max_per_destination": config["queue"]["maxPerDestination"],
        "mailrelay_backoff": [retry["minBackoff"], retry["maxBackoff"]],
        "mailrelay_limits": config["limits"],
    }


def report(info: dict[str, Any], bench: Bench, path: Path) -> None:
    """Write the raw results and print header, tables and targets (also after an interrupt)."""
    runs = [asdict(r) for r in bench.runs]
    rows = summary.summarize(runs)
    verdicts = targets.judge(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": info,
        "notes": bench.notes,
        "summary": rows,
        "targets": [
            {
                "label": v.target.label,
                "goal": v.goal_text(),
                "value": v.value,
                "detail": v.detail,
                "status": v.status,
            }
            for v in verdicts
        ],
        "runs": runs,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    print("\nmailrelay vs Postfix")
    for line in summary.header(info):
        print(f"  {line}")
    print()
    print(summary.text_table(summary.LOAD_HEAD, summary.load_rows(rows)))
    queue = summary.queue_rows(rows)
    if queue:
        print()
        print(summary.text_table(summary.QUEUE_HEAD, queue))
    print()
    for line in summary.variant_notes(rows, DEFAULT_VARIANT):
        print(line)
    for line in targets.lines(verdicts):
        print(line)
    print(f"\nraw results: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)


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
    parser.add_argument("--sizes", default=",".join(SIZES), help="message sizes: 2KB,100KB")
    parser.add_argument(
        "--sessions",
        default=",".join(map(str, SESSIONS)),
        help="concurrent sessions (default 1,20; 50 works too)",
    )
    parser.add_argument("--systems", default="postfix,mailrelay", help="postfix,mailrelay")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs of one-hop")
    parser.add_argument(
        "--queue-depths", default=None, help="deferred depths (default 10000,100000; quick 2000,10000)"
    )
    parser.add_argument(
        "--recovery-messages", type=int, default=None, help="spool size (default 100000; quick 10000)"
    )
    parser.add_argument("--probe-interval", type=float, default=0.1, help="seconds between latency probes")
    levelled = parser.add_argument_group("levelling (both systems)")
    levelled.add_argument(
        "--destination-concurrency",
        type=int,
        default=SHIPPED_DESTINATION_CONCURRENCY,
        help="connections per destination for each system (default: Postfix's shipped 20)",
    )
    postfix = parser.add_argument_group("Postfix")
    postfix.add_argument(
        "--postfix-variant",
        choices=list(VARIANTS),
        default=DEFAULT_VARIANT,
        help=f"the Postfix the comparisons use (default {DEFAULT_VARIANT}, the best measured)",
    )
    postfix.add_argument(
        "--postfix-variants",
        default=",".join(VARIANTS),
        help="what the `variants` scenario compares: names, or BASE+key=value+... experiments",
    )
    postfix.add_argument(
        "--postfix-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="experiment: a main.cf parameter",
    )
    mailrelay = parser.add_argument_group("mailrelay")
    mailrelay.add_argument(
        "--mailrelay-launch",
        choices=["relay", "up"],
        default="relay",
        help="relay: each replica as `up` starts it (default); up: the whole set under `mailrelay up`",
    )
    mailrelay.add_argument(
        "--workers",
        type=int,
        default=None,
        help="experiment: MailRelay spec.workers (default: the spec's auto)",
    )
    mailrelay.add_argument(
        "--mailrelay-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="experiment: a MailRelay spec field, dotted (queue.maxConcurrency=200)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where queues live (default: a new temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="raw results (default bench/results/<commit>-<timestamp>.json)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    variants = [v.strip() for v in args.postfix_variants.split(",") if v.strip()]
    for spec in variants:
        try:
            variant_from_spec(spec)
        except ValueError as exc:
            raise SystemExit(f"--postfix-variants: {exc}") from None
    postfix_overrides = _assignments(args.postfix_set, "--postfix-set")
    mailrelay_overrides = _assignments(args.mailrelay_set, "--mailrelay-set")
    if args.workers is not None:
        mailrelay_overrides["workers"] = args.workers
    overrides = [f"Postfix main.cf {k} = {v}" for k, v in postfix_overrides.items()]
    overrides += [f"MailRelay spec.{k} = {v}" for k, v in mailrelay_overrides.items()]
    if args.postfix_variant != DEFAULT_VARIANT:
        overrides.append(f"Postfix variant {args.postfix_variant} (default {DEFAULT_VARIANT})")
    if args.destination_concurrency != SHIPPED_DESTINATION_CONCURRENCY:
        overrides.append(f"destination concurrency {args.destination_concurrency} (shipped 20)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mailrelay-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)  # Postfix's unprivileged daemons must reach their data directory
    postfix = PostfixSettings(
        variant=VARIANTS[args.postfix_variant],
        destination_concurrency=args.destination_concurrency,
        overrides=postfix_overrides,
    )
    mailrelay = MailrelaySettings(
        destination_concurrency=args.destination_concurrency,
        overrides=mailrelay_overrides,
        launch=args.mailrelay_launch,
    )
    options = Options(
        quick=args.quick,
        repeat=args.repeat or (1 if args.quick else 3),
        workdir=workdir,
        probe_interval=args.probe_interval,
        sizes=[s.strip() for s in args.sizes.split(",") if s.strip()],
        sessions=[int(s) for s in args.sessions.split(",") if s.strip()],
        queue_depths=[
            int(d) for d in (args.queue_depths or ("2000,10000" if args.quick else "10000,100000")).split(",")
        ],
        recovery_messages=args.recovery_messages or (10000 if args.quick else 100000),
        systems=[s.strip() for s in args.systems.split(",") if s.strip()],
        postfix=postfix,
        mailrelay=mailrelay,
        variants=variants,
        latency=not args.no_latency,
    )
    info = machine()
    info["command"] = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    info["quick"] = args.quick
    info["repeat"] = options.repeat
    info["scenarios"] = scenarios
    info["overrides"] = overrides
    info["settings"] = {
        "postfix_variant": postfix.variant.describe(),
        "postfix_destination_concurrency": args.destination_concurrency,
        "postfix_backoff": [SHIPPED_MINIMAL_BACKOFF, SHIPPED_MAXIMAL_BACKOFF],
        **mailrelay_settings_info(mailrelay, workdir),
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or RESULTS / f"{info['commit'] or 'unknown'}-{stamp}.json"
    log(f"bench: commit {info['commit']}, load {info['load_before']}; work directory {workdir}")
    for line in summary.header(info):
        log(line)
    bench = Bench(options)
    started = time.monotonic()
    try:
        for scenario in scenarios:
            log(f"scenario {scenario}")
            getattr(bench, scenario.replace("-", "_"))()
    finally:
        info["duration_s"] = round(time.monotonic() - started)
        info["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        report(info, bench, path)
        if not args.keep:
            log(f"removing {workdir}")
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
