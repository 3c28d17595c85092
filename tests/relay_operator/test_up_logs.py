"""`mailrelay up --log-format json`: every relay's lines are JSON objects as a pod's would be
(``relay`` the MailRelay, ``pod`` the replica), printed without up's ``[replica]`` prefix so
they stay parseable; up's own lines stay text. Text is the default (the other up tests)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.relay_operator.up_harness import Up, find_by_subject, relocated_example, running, send, wait_for


def test_up_json_lines_name_relay_and_replica(tmp_path: Path) -> None:
    manifest, ports = relocated_example("chain", tmp_path)
    with running(Up(tmp_path, [manifest], "--log-format", "json")) as up:
        up.wait_ready()
        send(ports[2625], "clerk@branch.example.com", "ceo@example.com", "json logs")
        maildir = tmp_path / ".mailrelay" / "chain" / "headoffice" / "maildir"
        wait_for(
            lambda: find_by_subject(maildir / "archive" / "example.com" / "ceo", "json logs"),
            30,
            "the archive maildir",
            up.output,
        )
        assert up.stop(signal.SIGINT) == 0
    records = [json.loads(line) for line in up.lines if line.startswith("{")]
    assert not [line for line in up.lines if line.startswith("[") and '"time"' in line], (
        "a prefixed JSON line"
    )
    identities = {(r["relay"], r["pod"]) for r in records}
    assert {("branch", "branch-0"), ("headoffice", "headoffice-0")} <= identities
    assert {pod for relay, pod in identities if relay == "regional"} <= {"regional-0", "regional-1"}
    delivered = [r for r in records if r.get("event") == "delivered" and r["relay"] == "branch"]
    assert delivered and delivered[0]["recipient"] == "ceo@example.com"
    assert any(line.startswith("[up] ") for line in up.lines)
