"""Render the figures the fault, hostile-input and peer suites measured into docs/RELIABILITY.md.

    MAILRELAY_FIGURES=/tmp/figures.json pytest -m "not fuzz_long" tests/faults tests/hostile tests/peers
    python -m tests.faults.report /tmp/figures.json [more.json ...] --write docs/RELIABILITY.md

(or ``make reliability``). Everything between the ``figures:start`` and ``figures:end`` markers
is replaced by one table row per case, with the numbers exactly as recorded; the rest of the
page is hand-written. Several files are merged (later ones win per case), so the long fuzzing
run (``make fuzz-long`` with its own figures file) can be added to a normal run's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

START = "<!-- figures:start -->"
END = "<!-- figures:end -->"
ORDER = ["sent", "accepted", "delivered", "lost", "duplicated"]


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in sorted(value.items()))
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(figures: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| case | sent | accepted | delivered | lost | duplicated | other measured figures | run |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for case in sorted(figures):
        numbers = dict(figures[case])
        when = numbers.pop("recorded", "")
        main = [_value(numbers.pop(key)) if key in numbers else "" for key in ORDER]
        other = "; ".join(f"{key.replace('_', ' ')}: {_value(v)}" for key, v in sorted(numbers.items()))
        lines.append(f"| `{case}` | " + " | ".join(main) + f" | {other} | {when} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", nargs="+", type=Path)
    parser.add_argument("--write", type=Path, help="the markdown file whose figures section to replace")
    args = parser.parse_args(argv)
    merged: dict[str, dict[str, Any]] = {}
    for path in args.figures:
        merged.update(json.loads(path.read_text()))
    table = render(merged)
    if args.write is None:
        sys.stdout.write(table)
        return 0
    text = args.write.read_text()
    if START not in text or END not in text:
        print(f"{args.write}: no {START} ... {END} section", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.write.write_text(f"{head}{START}\n{table}{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
