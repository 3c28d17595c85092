"""``python -m bench.report [results.json]``: a `bench.run`'s raw results as Markdown for
bench/RESULTS.md: what ran (header), the tables of medians, and every target with met / not met.
Without an argument: the newest file in bench/results/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import summary, targets
from bench.postfix_config import DEFAULT_VARIANT
from bench.systems import REPO

RESULTS = REPO / "bench" / "results"


def markdown(data: dict[str, Any], source: str = "") -> str:
    info = data["machine"]
    rows = data["summary"]
    command = info["command"].replace("python -m", ".venv/bin/python -m")
    out = [f"- {line}" for line in summary.header(info)]
    out += [
        f"- command: `{command}`; took {info.get('duration_s', '?')} s; load average after "
        f"{info.get('load_after', '?')}" + (f"; raw results `{source}`" if source else ""),
        "",
        summary.markdown_table(summary.LOAD_HEAD, summary.load_rows(rows)),
    ]
    queue = summary.queue_rows(rows)
    if queue:
        out += ["", summary.markdown_table(summary.QUEUE_HEAD, queue)]
    notes = summary.variant_notes(rows, DEFAULT_VARIANT)
    out += ["", "```", *notes, *targets.lines(targets.judge(rows)), "```"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Print a bench.run raw results file as Markdown for bench/RESULTS.md.",
    )
    parser.add_argument(
        "results", nargs="?", type=Path, help="raw results (default: the newest in bench/results/)"
    )
    args = parser.parse_args(argv)
    path: Path | None = args.results
    if path is None:
        found = sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            parser.exit(2, "no results in bench/results/: run python -m bench.run first\n")
        path = found[-1]
    if not path.is_file():
        parser.exit(2, f"{path}: no such results file (python -m bench.run writes them to bench/results/)\n")
    source = str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path)
    print(markdown(json.loads(path.read_text()), source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
