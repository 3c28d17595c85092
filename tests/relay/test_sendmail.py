"""`mailrelay sendmail` as programs call it: a real subprocess (also under the name ``sendmail``,
a symlink to the console script) reading the message on stdin, submitting to a running relay
whose next hop is a real SMTP sink, and each sysexits status; the command line and message
rules as table tests of relay.core.sendmail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from relay.core import sendmail as rules
from tests.relay.apphelp import free_port, in_process, relay_to_sink_config, write_config
from tests.relay.smtpsink import SmtpSink

MAILRELAY = Path(sys.executable).parent / "mailrelay"


@contextlib.asynccontextmanager
async def relay_to(tmp_path: Path, sink_port: int) -> AsyncIterator[int]:
    """A relay whose routes send example.com to the sink and refuse blocked.example.com; its
    SMTP port."""
    data = relay_to_sink_config(
        tmp_path,
        hostname="sendmail.relay.test",
        domains=["example.com"],
        sink_port=sink_port,
        acceptDomains=["example.com", "blocked.example.com"],
    )
    data["routes"].append(
        {
            "name": "refused",
            "priority": 10,
            "match": {"recipientDomains": ["blocked.example.com"]},
            "nextHop": {"kind": "reject", "code": 550, "message": "5.1.1 no such user"},
        }
    )
    async with in_process(write_config(tmp_path, data)):
        yield int(data["listeners"][0]["port"])


async def sendmail(
    argv: list[str], stdin: bytes, *, program: list[str] | None = None, **env: str
) -> tuple[int, str]:
    """Run the command as a program would: (exit status, stderr)."""
    command = program or [str(MAILRELAY), "sendmail"]
    process = await asyncio.create_subprocess_exec(
        *command,
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    _out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, err.decode()


def after_received(content: bytes) -> bytes:
    assert content.startswith(b"Received: ")
    end = content.index(b"\r\n", content.index(b"; "))
    return content[end + 2 :]


MESSAGE = (
    b"From: Cron <cron@example.com>\n"
    b"To: Carol <carol@example.com>\n"
    b"Cc: erin@example.com\n"
    b"Bcc: frank@example.com,\n grace@example.com\n"
    b"Subject: nightly report\n"
    b"Date: Thu, 03 Dec 2026 03:00:00 +0000\n"
    b"Message-ID: <nightly@example.com>\n"
    b"\n"
    b"all good\n"
    b".\n"
    b"the dot above is content with -i\n"
)


async def test_sendmail_t_takes_to_cc_bcc_strips_bcc_and_the_relay_delivers_it(tmp_path: Path) -> None:
    sink = await SmtpSink().start()
    async with relay_to(tmp_path, sink.port) as port:
        link = tmp_path / "bin" / "sendmail"  # what the image ships at /usr/sbin/sendmail
        link.parent.mkdir()
        link.symlink_to(MAILRELAY)
        status, err = await sendmail(
            ["-t", "-i"], MESSAGE, program=[str(link)], MAILRELAY_SERVER=f"127.0.0.1:{port}"
        )
        assert (status, err) == (0, "")
        await asyncio.wait_for(sink.arrived.wait(), 30)
    got = sink.messages[0]
    assert got.mail_from == "cron@example.com"
    assert sorted(got.rcpt_tos) == [
        "carol@example.com",
        "erin@example.com",
        "frank@example.com",
        "grace@example.com",
    ]
    expected = MESSAGE.replace(b"Bcc: frank@example.com,\n grace@example.com\n", b"").replace(b"\n", b"\r\n")
    assert after_received(got.content) == expected  # Bcc gone, nothing else changed
    assert b"frank" not in got.content and b"grace" not in got.content
    await sink.stop()


async def test_without_i_a_lone_dot_ends_the_message_and_f_F_make_the_sender(tmp_path: Path) -> None:
    sink = await SmtpSink().start()
    async with relay_to(tmp_path, sink.port) as port:
        body = b"Subject: backup\n\nline one\n.\nnever sent\n"
        status, err = await sendmail(
            [
                "--server",
                f"127.0.0.1:{port}",
                "-fbackup@example.com",
                "-F",
                "Backup Daemon",
                "carol@example.com",
            ],
            body,
        )
        assert (status, err) == (0, "")
        await asyncio.wait_for(sink.arrived.wait(), 30)
    got = sink.messages[0]
    assert got.mail_from == "backup@example.com" and got.rcpt_tos == ["carol@example.com"]
    content = after_received(got.content)
    assert content.startswith(b"From: Backup Daemon <backup@example.com>\r\nDate: ")
    assert b"\r\nMessage-ID: <" in content and content.endswith(b"Subject: backup\r\n\r\nline one\r\n")
    await sink.stop()


async def test_each_exit_status(tmp_path: Path) -> None:
    sink = await SmtpSink(rcpt_replies={"later@example.com": "451 4.3.0 try again later"}).start()
    async with relay_to(tmp_path, sink.port) as port:
        relay = ["--server", f"127.0.0.1:{port}"]
        note = b"Subject: x\n\nhello\n"
        cases: list[tuple[list[str], bytes, int, str]] = [
            (relay, note, 64, "no recipients"),
            ([*relay, "-t"], note, 64, "no recipients in To, Cc or Bcc"),
            ([*relay, "-Z", "carol@example.com"], note, 64, "unknown option -Z"),
            ([*relay, "-bp"], note, 64, "-bp"),
            (["--server", "127.0.0.1:notaport", "carol@example.com"], note, 64, "--server"),
            ([*relay, "-f"], note, 64, "-f needs a value"),
            ([*relay, "-t"], b"To: not an address\n\nx\n", 65, "not a mail address"),
            ([*relay, "carol@example.com"], b"Subject: nul\n\n\x00\n", 65, "554"),
            ([*relay], b"", 64, "no recipients"),
            ([*relay, "carol@example.com"], b"", 65, "empty"),
            (
                [*relay, "carol@example.com", "x@blocked.example.com"],
                note,
                67,
                "<x@blocked.example.com> refused: 550",
            ),
            (["--server", f"127.0.0.1:{free_port()}", "carol@example.com"], note, 69, "cannot connect"),
            (["--server", f"127.0.0.1:{sink.port}", "later@example.com"], note, 75, "451"),
        ]
        for argv, data, expected, phrase in cases:
            status, err = await sendmail(argv, data)
            assert status == expected, (argv, err)
            assert phrase in err, (argv, err)
        # and success through the relay, with the default server taken from the environment
        assert (await sendmail(["carol@example.com"], note, MAILRELAY_SERVER=f"127.0.0.1:{port}"))[0] == 0
    await sink.stop()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-t", "-i"], rules.SendmailArgs(from_headers=True, ignore_dots=True)),
        (["-ti"], rules.SendmailArgs(from_headers=True, ignore_dots=True)),
        (["-oi", "-oem", "a@b.test"], rules.SendmailArgs(recipients=("a@b.test",), ignore_dots=True)),
        (
            ["-fme@b.test", "-F", "Me", "a@b.test"],
            rules.SendmailArgs(("a@b.test",), sender="me@b.test", full_name="Me"),
        ),
        (
            ["-r", "me@b.test", "-bm", "-N", "never", "-v", "--", "-odd@b.test"],
            rules.SendmailArgs(("-odd@b.test",), sender="me@b.test", verbose=True),
        ),
        (["--server=mx.test:2525", "a@b.test"], rules.SendmailArgs(("a@b.test",), server="mx.test:2525")),
    ],
)
def test_command_lines(argv: list[str], expected: rules.SendmailArgs) -> None:
    assert rules.parse_args(argv) == expected


@pytest.mark.parametrize("argv", [["-q"], ["-bs"], ["-x"], ["--verbose"], ["-F"], ["--server"]])
def test_command_lines_refused(argv: list[str]) -> None:
    with pytest.raises(rules.UsageError):
        rules.parse_args(argv)


def test_servers_and_exit_statuses() -> None:
    assert rules.parse_server("127.0.0.1") == ("127.0.0.1", 25)
    assert rules.parse_server("[::1]:2525") == ("::1", 2525)
    assert rules.parse_server("relay.test:587") == ("relay.test", 587)
    assert rules.status_for_failure("connect", None) == 69
    assert rules.status_for_failure("greeting", 421) == 75
    assert rules.status_for_failure("greeting", 554) == 69
    assert rules.status_for_failure("sender", 553) == 65
    assert rules.status_for_failure("sender", 451) == 75
    assert rules.status_for_failure("session", None) == 75
    assert rules.status_for_recipients([(True, 250, "data")]) == 0
    assert rules.status_for_recipients([(True, 250, "data"), (False, 550, "rcpt")]) == 67
    assert rules.status_for_recipients([(False, 554, "data")]) == 65
    assert rules.status_for_recipients([(True, 250, "data"), (False, 452, "rcpt")]) == 75


def test_messages() -> None:
    now = datetime(2026, 12, 3, 3, 0, tzinfo=UTC)
    args: dict[str, Any] = {"user": "cron", "hostname": "host.test", "now": now, "token": "t1"}
    bare = rules.prepare(b"just a body\n", rules.SendmailArgs(("a@b.test",)), **args)
    assert bare.mail_from == "cron@host.test"
    assert bare.content == (
        b"From: cron@host.test\r\nDate: Thu, 03 Dec 2026 03:00:00 +0000\r\nMessage-ID: <t1@host.test>\r\n"
        b"\r\njust a body\r\n"
    )
    group = rules.prepare(
        b"From: a@b.test\nTo: undisclosed-recipients:;\nBcc: c@d.test\n\nx\n",
        rules.SendmailArgs(from_headers=True),
        **args,
    )
    assert group.recipients == ("c@d.test",) and b"Bcc" not in group.content
    with pytest.raises(rules.MessageError):
        rules.prepare(
            b"To: a@b.test\n\nx\n", rules.SendmailArgs(("a@b.test",), sender="not an address"), **args
        )
