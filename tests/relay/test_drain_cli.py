"""`mailrelay drain` (issue 14): a spool no relay serves is handed to a running peer's handoff
listener, message by message, with the queue state kept; exit 0 when empty, 1 when some could
not be handed off, 2 on usage errors. Real relay processes on loopback."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from tests.relay.apphelp import RelayRun, free_port, until
from tests.relay.handoffhelp import Peers, send_dsn_message


def drain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "drain", *args], capture_output=True, text=True, timeout=120
    )


def test_usage_errors_exit_2_and_say_what_is_wrong(tmp_path: Path) -> None:
    credential = tmp_path / "credential"
    credential.write_text("secret\n")
    spool = tmp_path / "spool"
    spool.mkdir()
    bad_to = drain("--spool", str(spool), "--to", "nohost", "--credential-file", str(credential))
    assert bad_to.returncode == 2 and "use HOST:PORT" in bad_to.stderr
    bad_port = drain("--spool", str(spool), "--to", "h:99999", "--credential-file", str(credential))
    assert bad_port.returncode == 2 and "--to" in bad_port.stderr
    missing = drain("--spool", str(spool), "--to", "h:2526", "--credential-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "--credential-file" in missing.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    blank = drain("--spool", str(spool), "--to", "h:2526", "--credential-file", str(empty))
    assert blank.returncode == 2 and "empty" in blank.stderr
    no_spool = drain(
        "--spool", str(tmp_path / "gone"), "--to", "h:2526", "--credential-file", str(credential)
    )
    assert no_spool.returncode == 2 and "--spool" in no_spool.stderr
    timeout = drain(
        "--spool", str(spool), "--to", "h:1", "--credential-file", str(credential), "--timeout", "x"
    )
    assert timeout.returncode == 2 and "--timeout" in timeout.stderr
    nothing = drain("--spool", str(spool), "--to", "127.0.0.1:1", "--credential-file", str(credential))
    assert nothing.returncode == 0 and "is empty: 0 message(s) handed off" in nothing.stdout


async def test_an_orphaned_spool_is_handed_to_a_peer(tmp_path: Path, runs: list[RelayRun]) -> None:
    retry = {"minBackoff": "1h", "maxBackoff": "2h", "maxLifetime": "5d"}
    peers = Peers(tmp_path, free_port(), ["edge-0", "edge-1"], retry=retry)
    peers.start(runs)
    keep, gone = peers["edge-0"], peers["edge-1"]
    for i in range(5):
        await send_dsn_message(gone.smtp_port, f"orphan{i}")
    await until(lambda: gone.counts()["deferred"] == 5, timeout=60)
    gone.run.signal(signal.SIGTERM)  # the pod is removed; its volume keeps the mail
    assert await asyncio.to_thread(gone.run.wait, 60) == 0
    before = gone.headers()

    # nobody listens: exit 1, the mail stays
    refused = await asyncio.to_thread(
        drain,
        *("--spool", str(gone.spool), "--to", f"127.0.0.1:{free_port()}"),
        *("--credential-file", str(peers.credential), "--timeout", "1s"),
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "5 message(s) could not be handed off" in refused.stderr and "no peer reachable" in refused.stdout
    assert gone.queued() == 5

    done = await asyncio.to_thread(
        drain,
        *("--spool", str(gone.spool), "--to", f"127.0.0.1:{keep.handoff_port}"),
        *("--credential-file", str(peers.credential)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pass 1: handed off 5" in done.stdout and "is empty: 5 message(s) handed off" in done.stdout
    assert gone.queued() == 0
    after = keep.headers()
    assert set(after) == set(before)
    for queue_id, (_state, entry) in before.items():
        assert after[queue_id][1].arrival == entry.arrival
        assert after[queue_id][1].attempts == entry.attempts
        assert after[queue_id][1].envelope == entry.envelope
