"""Structured logs (relay.logs) from a real relay process: with ``logFormat: json`` (or
``--log-format json``) every line of its output is one JSON object, and each mail event kind
(accepted, rejected, delivered, deferred, bounced, expired, dsn) carries its fields; text stays
the default and keeps its one summary line per attempt."""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.logs import EVENTS
from tests.relay.apphelp import RelayRun, ports, relay_to_sink_config, write_config
from tests.relay.smtpsink import SmtpSink

COMMON = ("time", "level", "logger", "message", "relay", "pod")
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "accepted": ("queue_id", "sender", "size", "nrcpt", "client"),
    "rejected": ("queue_id", "client", "code", "dsn", "reply", "reason"),
    "delivered": ("queue_id", "recipient", "route", "next_hop", "code", "dsn", "reply", "duration"),
    "deferred": (
        *("queue_id", "recipient", "route", "next_hop", "code", "dsn", "reply", "duration", "attempts"),
    ),
    "bounced": ("queue_id", "recipient", "route", "next_hop", "code", "dsn", "reply", "duration"),
    "expired": ("queue_id", "recipient", "route", "code", "dsn", "reply", "duration", "attempts"),
    "dsn": ("queue_id", "dsn_id", "recipient", "reply"),
}


def _send(port: int, sender: str, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.sendmail(sender, recipients, b"Subject: log test\r\n\r\nbody\r\n")


def _config(tmp_path: Path, sink: SmtpSink, **extra: Any) -> tuple[Path, int]:
    domains = ["d.test", "s.test"]
    data = relay_to_sink_config(
        tmp_path, hostname="logs.test", domains=domains, sink_port=sink.port, workers=1, **extra
    )
    port, _ = ports(data)
    data["queue"]["retry"] = {"minBackoff": "1s", "maxBackoff": "1s", "maxLifetime": "3s"}
    return write_config(tmp_path, data), port


def _parsed(run: RelayRun) -> list[dict[str, Any]]:
    lines = [line for line in run.lines if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not one JSON object per line: {line!r}")
    return parsed


@pytest.mark.parametrize("how", ["config", "flag"])
async def test_every_event_kind_is_one_json_line_with_its_fields(
    tmp_path: Path, runs: list[RelayRun], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = ("logs.test", socket.gethostname())  # relay hostname, host name: outside a pod
    if how == "flag":  # what a pod's environment says (the operator's builders set both)
        monkeypatch.setenv("MAILRELAY_RELAY", "logs")
        monkeypatch.setenv("MAILRELAY_POD_NAME", "logs-0")
        identity = ("logs", "logs-0")
    sink = SmtpSink(
        rcpt_replies={"later@d.test": "451 4.3.0 try again later", "bad@d.test": "550 5.1.1 no such user"}
    )
    await sink.start()
    try:
        extra = {"logFormat": "json"} if how == "config" else {}
        config, port = _config(tmp_path, sink, **extra)
        run = RelayRun(config, args=("--log-format", "json") if how == "flag" else ())
        runs.append(run.start())
        # the sink answers on this event loop: block only in threads
        await asyncio.to_thread(run.wait_for, '"relay logs.test ready')
        await asyncio.to_thread(_send, port, "sender@s.test", ["ok@d.test", "later@d.test", "bad@d.test"])
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await asyncio.to_thread(_send, port, "sender@s.test", ["x@elsewhere.test"])
        await asyncio.to_thread(run.wait_for, '"event": "expired"', timeout=60)
        await asyncio.to_thread(run.wait_for, '"event": "dsn"', occurrences=2, timeout=60)
    finally:
        await sink.stop()
    lines = _parsed(run)
    for line in lines:
        for field in COMMON:
            assert line.get(field) not in (None, ""), f"{field} missing in {line}"
        assert (line["relay"], line["pod"]) == identity
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        if "event" in line:
            assert line["event"] in EVENTS, line
            by_event.setdefault(line["event"], []).append(line)
    assert set(by_event) == set(EVENT_FIELDS), f"event kinds seen: {sorted(by_event)}"
    for event, fields in EVENT_FIELDS.items():
        for line in by_event[event]:
            for field in fields:
                assert line.get(field) not in (None, ""), f"{event}: {field} missing in {line}"
    [delivered] = [x for x in by_event["delivered"] if x["recipient"] == "ok@d.test"]
    assert (delivered["code"], delivered["dsn"], delivered["route"]) == (250, "2.0.0", "to-sink")
    assert delivered["next_hop"].startswith("127.0.0.1")
    assert isinstance(delivered["duration"], float) and delivered["duration"] >= 0
    [bounced] = [x for x in by_event["bounced"] if x["recipient"] == "bad@d.test"]
    assert (bounced["code"], bounced["dsn"]) == (550, "5.1.1") and "no such user" in bounced["reply"]
    deferred = [x for x in by_event["deferred"] if x["recipient"] == "later@d.test"]
    assert deferred and deferred[0]["code"] == 451 and deferred[0]["attempts"] == 1
    [expired] = [x for x in by_event["expired"] if x["recipient"] == "later@d.test"]
    assert expired["dsn"] == "4.4.7" and "try again later" in expired["reply"]
    [rejected] = by_event["rejected"]
    assert rejected["code"] >= 550 and rejected["dsn"].startswith("5.")
    assert rejected["sender"] == "sender@s.test"
    accepted = by_event["accepted"]
    assert any(x["queue_id"] == delivered["queue_id"] and x["nrcpt"] == 3 for x in accepted)
    assert all(line["level"] in ("debug", "info", "warning", "error") for line in lines)
    assert all(line["time"].endswith("Z") for line in lines)


async def test_text_is_the_default_with_one_summary_line_per_attempt(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    sink = SmtpSink()
    await sink.start()
    try:
        config, port = _config(tmp_path, sink)
        run = RelayRun(config)
        runs.append(run.start())
        await asyncio.to_thread(run.wait_for, "relay logs.test ready")
        await asyncio.to_thread(_send, port, "sender@s.test", ["ok@d.test", "two@d.test"])
        line = await asyncio.to_thread(run.wait_for, r"\] done: ")
    finally:
        await sink.stop()
    assert "ok@d.test=delivered 250" in line and "two@d.test=delivered 250" in line
    assert not any(text.lstrip().startswith("{") for text in run.lines)
    assert run.count(r"accepted size=") == 1


async def test_a_reload_switches_the_format(tmp_path: Path, runs: list[RelayRun]) -> None:
    """A MailRelay's spec.logFormat edit reaches running pods through the ConfigMap: a reload
    (SIGHUP here; a file change in a pod) applies it without a restart, in every worker."""
    sink = SmtpSink()
    await sink.start()
    try:
        config, port = _config(tmp_path, sink)
        data = yaml.safe_load(config.read_text())
        data["workers"] = 2
        write_config(tmp_path, data)
        run = RelayRun(config)
        runs.append(run.start())
        await asyncio.to_thread(run.wait_for, "relay logs.test ready")
        data["logFormat"] = "json"
        write_config(tmp_path, data)
        run.signal(signal.SIGHUP)
        await asyncio.to_thread(run.wait_for, '"message": "config reloaded')
        await asyncio.to_thread(run.wait_for, r'^\{.*"message": "config reloaded: 1 routes"', occurrences=2)
        mark = len(run.lines)
        await asyncio.to_thread(_send, port, "sender@s.test", ["ok@d.test"])
        await asyncio.to_thread(run.wait_for, '"event": "delivered"')
    finally:
        await sink.stop()
    after = [line for line in run.lines[mark:] if line.strip()]
    assert after and all(json.loads(line)["relay"] == "logs.test" for line in after)
