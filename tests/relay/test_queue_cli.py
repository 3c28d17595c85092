"""`mailrelay queue list|show|retry|hold|delete` and `mailrelay hash-password` on a real spool."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from relay.cli import main
from relay.core.model import Disposition, Envelope, QueueEntry, Recipient, RecipientOutcome
from relay.spool import Spool, new_queue_id
from relay.users import verify_password


def fill_spool(directory: Path) -> tuple[str, str]:
    """One message waiting in incoming/, one deferred with a last error."""
    spool = Spool(directory)
    spool.prepare()
    rcpt = Recipient("u@example.com", notify=("FAILURE",))
    fresh = QueueEntry(
        queue_id=new_queue_id(),
        envelope=Envelope("a@sender.org", (rcpt,)),
        arrival=1_700_000_000.0,
        pending=(rcpt,),
        client_address="127.0.0.1",
        helo="client.test",
    )
    deferred_id = new_queue_id()
    outcome = RecipientOutcome(
        rcpt, Disposition.DEFERRED, 451, "4.4.1", "connection refused", "mx.example.com"
    )
    deferred = QueueEntry(
        queue_id=deferred_id,
        envelope=Envelope("", (rcpt,)),
        arrival=1_700_000_000.0,
        pending=(rcpt,),
        attempts=3,
        next_attempt=1_900_000_000.0,
        results=(outcome,),
    )

    async def store() -> None:
        await spool.store(fresh, b"Subject: one\r\n\r\nbody\r\n")
        await spool.store(deferred, b"Subject: two\r\n\r\nbody\r\n")
        message = await spool.claim(deferred_id)
        assert message is not None
        await spool.defer(deferred.with_changes(size=len(message.content)), message.content)

    asyncio.run(store())
    spool.close()
    return fresh.queue_id, deferred_id


def test_queue_commands(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    fresh_id, deferred_id = fill_spool(queue)
    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "hostname": "r.test",
                "listeners": [{"name": "smtp", "port": 2525}],
                "queue": {"directory": str(queue)},
            }
        )
    )
    runner = CliRunner()
    result = runner.invoke(main, ["queue", "list", "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "ARRIVAL", "SENDER"]
    fresh_line = next(line for line in lines if line.startswith(fresh_id))
    assert "incoming" in fresh_line and "a@sender.org" in fresh_line and "u@example.com" in fresh_line
    deferred_line = next(line for line in lines if line.startswith(deferred_id))
    assert (
        "deferred" in deferred_line
        and "<>" in deferred_line
        and "451 4.4.1 connection refused" in deferred_line
    )
    assert "2030-03-17T17:46:40Z" in deferred_line  # the next attempt
    assert lines[-1] == "2 message(s)"

    result = runner.invoke(main, ["queue", "list", "--spool", str(queue), "--json"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert {row["id"]: row["attempts"] for row in rows} == {fresh_id: 0, deferred_id: 3}

    result = runner.invoke(main, ["queue", "show", deferred_id, "--spool", str(queue)])
    assert result.exit_code == 0
    assert "state: deferred" in result.output and "u@example.com NOTIFY=FAILURE" in result.output
    assert "Subject: two" in result.output and "body" not in result.output
    assert (
        "body" in runner.invoke(main, ["queue", "show", deferred_id, "--spool", str(queue), "--full"]).output
    )

    assert runner.invoke(main, ["queue", "hold", fresh_id, "--spool", str(queue)]).exit_code == 0
    spool = Spool(queue)
    assert spool.ids("hold") == [fresh_id]
    assert runner.invoke(main, ["queue", "retry", fresh_id, "--spool", str(queue)]).exit_code == 0
    assert runner.invoke(main, ["queue", "retry", deferred_id, "--spool", str(queue)]).exit_code == 0
    assert sorted(spool.ids("incoming")) == sorted([fresh_id, deferred_id])
    assert runner.invoke(main, ["queue", "delete", fresh_id, "--spool", str(queue)]).exit_code == 0
    assert spool.ids("incoming") == [deferred_id]
    spool.close()

    missing = runner.invoke(main, ["queue", "delete", fresh_id, "--spool", str(queue)])
    assert missing.exit_code == 1 and "no message" in missing.output
    bad = runner.invoke(main, ["queue", "show", "../../etc", "--spool", str(queue)])
    assert bad.exit_code == 1
    neither = runner.invoke(main, ["queue", "list"])
    assert neither.exit_code == 2


def test_hash_password(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main, ["hash-password", "--user", "alice", "--iterations", "1000"], input="s3cret\n"
    )
    assert result.exit_code == 0, result.output
    user, stored = result.output.strip().split(":", 1)
    assert user == "alice" and stored.startswith("{PBKDF2-SHA256}1000$")
    assert verify_password(stored, "s3cret") and not verify_password(stored, "other")
    assert runner.invoke(main, ["hash-password"], input="\n").exit_code == 2
