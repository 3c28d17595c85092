"""The repository layout rules from DESIGN.md section 3."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_operator_folder_is_not_a_package() -> None:
    # A package named `operator` would shadow the standard library module.
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert (ROOT / "operator" / "relay_operator" / "__init__.py").exists()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci_lines == ["make test"]
    fenced = re.findall(r"^```(\w*)\n(.*?)^```", readme, flags=re.S | re.M)  # every fence pairs
    blocks = [body for language, body in fenced if language in ("", "sh", "bash", "console")]
    commands = [shlex.split(line)[0:2] for block in blocks for line in block.splitlines() if line.strip()]
    assert ["make", "test"] in commands
    assert ["make", "up"] in commands
