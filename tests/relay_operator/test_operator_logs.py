"""`mailrelay operator --log-format json` against the API emulator: every line it prints is one
JSON object (kopf's JSON format), none is printed twice; in text every line has kopf's format
(once: the CLI group's own handler is replaced, not added to)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.relay_operator.conftest import OperatorProcess, RawHttp
from tests.relay_operator.k8s_emulator import EmulatorThread


def _namespace(emulator: EmulatorThread, name: str) -> str:
    status, _ = RawHttp(emulator.url)("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert status == 201
    return name


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_operator_log_lines_in_each_format(
    operator_kubeconfig: Path, emulator: EmulatorThread, tmp_path: Path, log_format: str
) -> None:
    namespace = _namespace(emulator, f"logs-{log_format}")
    process = OperatorProcess(
        operator_kubeconfig, tmp_path / "operator.log", "--namespace", namespace, "--log-format", log_format
    )
    try:
        process.wait_alive()
    finally:
        assert process.stop() == 0, process.tail()
    lines = [line for line in (tmp_path / "operator.log").read_text().splitlines() if line.strip()]
    assert lines
    assert len(lines) == len(set(lines)), "a line printed twice:\n" + "\n".join(lines)
    if log_format == "text":
        # kopf's format, "[2026-12-03 13:48:02,054] logger [INFO    ] message", and only it
        assert all(re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+\] \S", line) for line in lines), "\n".join(lines)
        return
    for line in lines:
        record = json.loads(line)
        assert record["message"] and record["timestamp"] and record["severity"], record
