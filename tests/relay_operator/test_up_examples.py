"""The chain and failover examples run as their READMEs say (ports moved to free ones), and
`mailrelay graph` draws the quickstart."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.relay_operator.up_harness import (
    EXAMPLES,
    Up,
    find_by_subject,
    load_documents,
    relocated_example,
    running,
    send,
    wait_for,
    write_documents,
)


def test_chain_example_adds_one_received_header_per_hop(tmp_path: Path) -> None:
    manifest, ports = relocated_example("chain", tmp_path)
    with running(Up(tmp_path, [manifest])) as up:
        up.wait_ready()
        send(ports[2625], "clerk@branch.example.com", "ceo@example.com", "up the chain")
        send(ports[2625], "clerk@branch.example.com", "counsel@legal.example.com", "for the lawyers")
        maildir = tmp_path / ".mailrelay" / "chain" / "headoffice" / "maildir"
        mail = wait_for(
            lambda: find_by_subject(maildir / "archive" / "example.com" / "ceo", "up the chain"),
            30,
            "the archive maildir",
            up.output,
        )
        hosts = [" ".join(h.split()).split(" by ")[1].split()[0] for h in mail.get_all("Received")]
        assert hosts == ["headoffice.chain.test", "regional.chain.test", "branch.chain.test"]
        wait_for(
            lambda: find_by_subject(maildir / "legal", "for the lawyers"), 30, "the legal maildir", up.output
        )
        assert len(up.pids("regional")) == 2
        assert up.stop(signal.SIGINT) == 0


def test_failover_example_delivers_through_the_backup_while_primary_is_down(tmp_path: Path) -> None:
    manifest, ports = relocated_example("failover", tmp_path)
    with running(Up(tmp_path, [manifest])) as up:
        up.wait_ready()
        assert up.processes("primary") == []  # replicas: 0
        send(ports[2725], "app@failover.test", "user@example.com", "primary is down")
        root = tmp_path / ".mailrelay" / "failover"
        mail = wait_for(
            lambda: find_by_subject(root / "backup" / "maildir" / "via-backup", "primary is down"),
            30,
            "the backup's maildir",
            up.output,
        )
        assert "by backup.failover.test" in " ".join(mail.get_all("Received")[0].split())
        assert not (root / "primary" / "maildir").exists()

        # bring primary up, as the README says: new mail goes to it again
        docs = load_documents(manifest)
        next(d for d in docs if d["metadata"]["name"] == "primary")["spec"]["replicas"] = 1
        write_documents(manifest, docs)
        wait_for(lambda: len(up.pids("primary")) == 1, 20, "primary to start", up.output)
        up.wait_ready()
        send(ports[2725], "app@failover.test", "user@example.com", "primary is back")
        wait_for(
            lambda: find_by_subject(root / "primary" / "maildir" / "via-primary", "primary is back"),
            30,
            "the primary's maildir",
            up.output,
        )
        assert find_by_subject(root / "backup" / "maildir" / "via-backup", "primary is back") is None
        assert up.stop(signal.SIGINT) == 0


def test_graph_of_the_quickstart(tmp_path: Path) -> None:
    output = tmp_path / "quickstart.svg"
    result = subprocess.run(
        [sys.executable, "-m", "relay", "graph", "-f", str(EXAMPLES / "quickstart"), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "quickstart/internal  (1 replica(s), internal.quickstart.test)" in result.stdout
    assert "route external-via-smarthost [priority 100]: to example.net, *.example.net" in result.stdout
    assert "→ smarthost 127.0.0.1:2528 (tls starttls, authenticated)" in result.stdout
    assert "→ relay quickstart/capture" in result.stdout
    svg = output.read_text()
    assert svg.lstrip().startswith("<?xml") and "quickstart/edge" in svg

    dot = tmp_path / "quickstart.dot"
    again = subprocess.run(
        [sys.executable, "-m", "relay", "graph", "-f", str(EXAMPLES / "quickstart"), "-o", str(dot), "--dot"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert dot.read_text() == again.stdout
    assert '"relay:quickstart/edge" -> "relay:quickstart/internal"' in again.stdout
