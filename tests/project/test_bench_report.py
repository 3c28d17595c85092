"""bench.report: a committed raw results file of bench.run becomes the Markdown of
bench/RESULTS.md with every issue-13 target judged; a missing file is a CLI error (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import report, targets

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "ba10b80-20261203T164100Z.json"


def test_a_committed_run_prints_every_target_with_its_verdict() -> None:
    text = report.markdown(json.loads(RESULTS.read_text()), "bench/results/" + RESULTS.name)
    assert "| one-hop | 2KB x20 | mailrelay |" in text
    judged = targets.judge(json.loads(RESULTS.read_text())["summary"])
    lines = targets.lines(judged)
    assert len([line for line in lines if line.rstrip().endswith(("met", "NOT met"))]) >= 10
    for line in lines:
        assert line in text


def test_the_cli_explains_itself_and_refuses_a_missing_file(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "bench.report"]
    shown = subprocess.run([*run, "--help"], cwd=REPO, capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and "raw results" in shown.stdout
    missing = subprocess.run(
        [*run, str(tmp_path / "none.json")], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "no such results file" in missing.stderr
