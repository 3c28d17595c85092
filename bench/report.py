"""``python -m bench.report [results.json]``: the measured figures of a `bench.run` as Markdown
(for bench/RESULTS.md): machine, command, the table of medians and the target lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.run import REPO, verdicts


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float | int) else str(value)


def markdown(data: dict[str, Any]) -> str:
    info = data["machine"]
    rows = data["summary"]
    out = [
        f"Measured {info['date']} on {info['cores']} cores ({info['cpu']}), kernel {info['kernel']}, "
        f"Python {info['python']}, Postfix {info['postfix']}, "
        f"mailrelay at commit {info['mailrelay_commit']}; "
        f"load average before the run {info['load_before']}; the run took {info.get('duration_s', '?')} s.",
        "",
        f"Command: `{info['command'].replace('python -m', '.venv/bin/python -m')}`",
        "",
        "| scenario | case | system | msg/s | share of ceiling | p50 ms | p99 ms | CPU ms/msg "
        "| peak MB (PSS) | runs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["scenario"] not in ("ceiling", "one-hop", "chain"):
            continue
        runs = str(r["runs"]) + (f" ({r['incomplete']} incomplete)" if r["incomplete"] else "")
        out.append(
            f"| {r['scenario']} | {r['case']} | {r['system']} | {_cell(r['rate'], 0)} | "
            f"{_cell(r.get('share_of_ceiling'), 2)} | {_cell(r['p50_ms'], 1)} | {_cell(r['p99_ms'], 1)} | "
            f"{_cell(r['cpu_ms_per_msg'], 2)} | {_cell(r['peak_pss_mb'], 1)} | {runs} |"
        )
    queue = [r for r in rows if r["scenario"] in ("queue", "recovery")]
    if queue:
        out += [
            "",
            "| scenario | case | system | PSS MB | bytes per queued msg | fill msg/s | fill CPU ms/msg "
            "| seconds |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in queue:
            out.append(
                f"| {r['scenario']} | {r['case']} | {r['system']} | {_cell(r['peak_pss_mb'], 1)} | "
                f"{_cell(r.get('bytes_per_queued_msg'), 0)} | "
                f"{_cell(r['rate'] if r['scenario'] == 'queue' else None, 0)} | "
                f"{_cell(r['cpu_ms_per_msg'], 2)} | {_cell(r['seconds'], 2)} |"
            )
    out += ["", "```", *verdicts(rows), "```"]
    return "\n".join(out)


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "bench" / "out" / "results.json"
    print(markdown(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
