"""`mailrelay queue` against a running relay, as an operator uses it in a pod: no path
arguments (the config comes from ``MAILRELAY_CONFIG``, as the image sets it), bulk selections
(`--all`, `--sender`, `--recipient`, `--older-than`) for hold, retry, release and delete, and
`flush`; the relay delivers what the commands make due, and leaves what they hold."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.relay.apphelp import RelayRun, ports, relay_to_sink_config, until, write_config
from tests.relay.smtpsink import SmtpSink
from tests.relay.test_logs import _send

LATER = "451 4.3.0 try again later"


def _queue(config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("MAILRELAY_CONFIG", None)
    if config is not None:
        env["MAILRELAY_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "relay", "queue", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _rows(config: Path) -> dict[str, dict[str, Any]]:
    done = _queue(config, "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {row["pending"][0]: row for row in rows}


async def test_bulk_queue_commands_on_a_running_relay(tmp_path: Path, runs: list[RelayRun]) -> None:
    addresses = ["a@d.test", "b@d.test", "c@d.test", "e@d.test"]
    sink = SmtpSink(rcpt_replies=dict.fromkeys(addresses, LATER))
    await sink.start()
    try:
        domains = ["d.test", "s.test"]
        data = relay_to_sink_config(
            tmp_path, hostname="queue.test", domains=domains, sink_port=sink.port, workers=1
        )
        port, _ = ports(data)
        data["queue"]["retry"] = {"minBackoff": "1h", "maxBackoff": "1h", "maxLifetime": "5d"}
        config = write_config(tmp_path, data)
        run = RelayRun(config)
        runs.append(run.start())
        await asyncio.to_thread(run.wait_for, "relay queue.test ready")
        for address in addresses[:3]:
            await asyncio.to_thread(_send, port, f"sender-{address[0]}@s.test", [address])
        await asyncio.to_thread(run.wait_for, r"deferred 1 recipients", occurrences=3)

        rows = _rows(config)
        assert {rows[a]["state"] for a in addresses[:3]} == {"deferred"}
        # a selection, no ids: hold what sender-a sent, then what waits for c@
        held = _queue(config, "hold", "--sender", "SENDER-A@*")
        assert held.returncode == 0 and "1 message(s) held" in held.stdout, held
        assert _queue(config, "hold", "--recipient", "c@d.test").returncode == 0
        rows = _rows(config)
        assert (rows["a@d.test"]["state"], rows["b@d.test"]["state"], rows["c@d.test"]["state"]) == (
            "hold",
            "deferred",
            "hold",
        )

        sink.rcpt_replies.clear()  # the next hop takes mail now
        # flush: every deferred message now; held ones stay held
        flushed = _queue(config, "flush")
        assert flushed.returncode == 0 and "1 message(s) queued for delivery now" in flushed.stdout
        await until(lambda: any(m.rcpt_tos == ["b@d.test"] for m in sink.messages), timeout=60)
        assert set(_rows(config)) == {"a@d.test", "c@d.test"}
        # release by recipient glob; a selection that matches nothing does nothing
        none = _queue(config, "release", "--recipient", "*@nowhere.test")
        assert none.returncode == 0 and "0 message(s) released" in none.stdout
        assert _queue(config, "release", "--recipient", "C@*").returncode == 0
        await until(lambda: any(m.rcpt_tos == ["c@d.test"] for m in sink.messages), timeout=60)
        assert _rows(config)["a@d.test"]["state"] == "hold"
        # retry takes held messages too
        retried = _queue(config, "retry", "--older-than", "1s")
        assert retried.returncode == 0 and "1 message(s) queued for delivery now" in retried.stdout
        await until(lambda: any(m.rcpt_tos == ["a@d.test"] for m in sink.messages), timeout=60)

        # delete --all: nothing delivered, no bounce
        sink.rcpt_replies["e@d.test"] = LATER
        await asyncio.to_thread(_send, port, "sender-e@s.test", ["e@d.test"])
        await asyncio.to_thread(run.wait_for, r"deferred 1 recipients", occurrences=4)
        too_young = _queue(config, "delete", "--older-than", "1h")
        assert too_young.returncode == 0 and "0 message(s) deleted" in too_young.stdout
        deleted = _queue(config, "delete", "--all")
        assert deleted.returncode == 0 and "1 message(s) deleted" in deleted.stdout
        assert _rows(config) == {}
        assert _queue(config, "list").stdout.strip() == "queue is empty"
    finally:
        await sink.stop()
    assert not any("e@d.test" in m.rcpt_tos or m.mail_from == "" for m in sink.messages)


def test_bulk_usage_errors_exit_2(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "hostname": "r.test",
            "listeners": [{"name": "smtp", "port": 2525}],
            "queue": {"directory": str(tmp_path / "q")},
        },
    )
    (tmp_path / "q").mkdir()
    for args in (
        ("hold",),
        ("hold", "ABC", "--all"),
        ("delete", "--older-than", "soon"),
        ("retry", "X", "--sender", "a@*"),
    ):
        done = _queue(config, *args)
        assert done.returncode == 2, (args, done)
    assert _queue(config, "flush").stdout.strip() == "0 message(s) queued for delivery now"
    missing = _queue(tmp_path / "absent.yaml", "list")
    assert missing.returncode == 2 and "give --config FILE or --spool DIR" in missing.stderr
    unknown = _queue(config, "release", "ABC123")
    assert unknown.returncode == 1 and "no message ABC123" in unknown.stderr
