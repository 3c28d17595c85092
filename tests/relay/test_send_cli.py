"""`mailrelay send` end to end: the real click command (CliRunner, and once the installed console
script in a subprocess) against real aiosmtpd servers on 127.0.0.1 (plain, STARTTLS with trustme
certificates and AUTH, with and without SMTPUTF8)."""

from __future__ import annotations

import asyncio
import base64
import json
import mailbox
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from click.testing import CliRunner

from relay.cli import main
from tests.relay import media
from tests.relay.apphelp import RelayRun, free_port, until
from tests.relay.smtpsink import SmtpSink


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


@dataclass
class Recorder:
    """aiosmtpd handler: refuses some recipients, records every message."""

    refuse: dict[str, str] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)
    logins: list[tuple[bytes, bool]] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            Received(
                envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, envelope.mail_options
            )
        )
        return "250 2.0.0 OK queued as T1"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"alice", b"pa55 w0rd!")
        self.logins.append((data.login if isinstance(data, LoginPassword) else b"", ok))
        return AuthResult(success=ok, handled=False)


class Server:
    """An aiosmtpd SMTP server on 127.0.0.1, port 0, in its own thread and event loop."""

    def __init__(self, recorder: Recorder, **smtp_options: Any) -> None:
        self.recorder = recorder
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> asyncio.base_events.Server:
                return await self.loop.create_server(
                    lambda: SMTP(recorder, hostname="mx.test", **smtp_options), "127.0.0.1", 0
                )

            self.server = self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def plain() -> Iterator[Server]:
    server = Server(
        Recorder(refuse={"nobody@example.net": "550 5.1.1 <nobody@example.net>: no such user"}),
        enable_SMTPUTF8=True,
    )
    yield server
    server.stop()


@dataclass
class Tls:
    ca_file: Path
    server: Server


@pytest.fixture
def starttls_auth(tmp_path: Path) -> Iterator[Tls]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    recorder = Recorder()
    server = Server(
        recorder,
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        authenticator=recorder.authenticate,
    )
    yield Tls(ca_file, server)
    server.stop()


def run(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> Any:
    return CliRunner().invoke(main, ["send", *args], env=env, input=stdin, catch_exceptions=False)


A_TO_B = ("--from", "a@example.org", "--to", "b@example.net", "--body", "x")


def alice_to_bob(server: Server, *more: str) -> list[str]:
    """`mailrelay send` options for alice@example.org to bob@example.net over plain SMTP."""
    return [
        "--server",
        server.address,
        "--tls",
        "none",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        *more,
    ]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "image": tmp_path / "Straße am Meer.png",
        "audio": tmp_path / "song.mp3",
        "video": tmp_path / "clip.mp4",
        "html": tmp_path / "body.html",
    }
    paths["image"].write_bytes(media.png())
    paths["audio"].write_bytes(media.mp3())
    paths["video"].write_bytes(media.mp4())
    paths["html"].write_text("<p>Hello <b>everyone</b></p>\n")
    return paths


def compose_args(server: str, files: dict[str, Path]) -> list[str]:
    return [
        "--server",
        server,
        "--tls",
        "none",
        "--from",
        "Alice <alice@example.org>",
        "--to",
        "bob@example.net",
        "--to",
        "carol@example.net",
        "--bcc",
        "secret@example.com",
        "--subject",
        "Media for three",
        "--body",
        "Hello everyone,\nphotos, a song and a clip.\n",
        "--html-file",
        str(files["html"]),
        "--attach",
        str(files["image"]),
        "--attach",
        str(files["audio"]),
        "--attach",
        str(files["video"]),
        "--header",
        "Message-ID: <three.1@example.org>",
        "--header",
        "Date: Fri, 14 Mar 2025 15:09:26 +0000",
    ]


def test_send_three_recipients_with_media_is_received_byte_exact(
    plain: Server, files: dict[str, Path]
) -> None:
    args = compose_args(plain.address, files)
    dry = run(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    composed = dry.stdout_bytes.split(b" bytes)\n", 1)[1]

    result = run(*args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 3
    for line, address in zip(
        lines, ["bob@example.net", "carol@example.net", "secret@example.com"], strict=True
    ):
        assert line.split()[:2] == ["accepted", address]
        assert line.endswith("250 2.0.0 OK queued as T1")

    [received] = plain.recorder.messages
    assert received.mail_from == "alice@example.org"
    assert received.rcpt_tos == ["bob@example.net", "carol@example.net", "secret@example.com"]
    assert received.content == composed  # byte-exact: the server got what was composed

    message, parts, types = media.mixed_parts(received.content)
    assert types == ["multipart/alternative", "image/png", "audio/mpeg", "video/mp4"]
    assert [p.get_filename() for p in parts[1:]] == ["Straße am Meer.png", "song.mp3", "clip.mp4"]
    assert [p.get_payload(decode=True) for p in parts[1:]] == [media.png(), media.mp3(), media.mp4()]
    alternative = [p.get_content_type() for p in parts[0].iter_parts()]
    assert alternative == ["text/plain", "text/html"]
    # The bcc recipient is in no header of what was delivered.
    assert b"secret" not in received.content
    assert all("secret" not in str(value) for part in message.walk() for value in part.values())


def test_a_refused_recipient_exits_1_and_prints_its_code_and_text(plain: Server) -> None:
    result = run(*alice_to_bob(plain, "--to", "nobody@example.net", "--subject", "hi", "--body", "x"))
    assert result.exit_code == 1
    assert "accepted bob@example.net" in result.output
    assert "refused  nobody@example.net  550 5.1.1 <nobody@example.net>: no such user" in result.output
    [received] = plain.recorder.messages
    assert received.rcpt_tos == ["bob@example.net"]


def test_all_recipients_refused_sends_no_data(plain: Server) -> None:
    result = run(
        "--server", plain.address, "--tls", "none", "--from", "a@example.org", "--to", "nobody@example.net"
    )
    assert result.exit_code == 1 and "refused  nobody@example.net  550" in result.output
    assert plain.recorder.messages == []


def test_auth_over_starttls_with_the_password_from_the_environment(starttls_auth: Tls) -> None:
    common = [
        "--server",
        starttls_auth.server.address,
        "--tls",
        "starttls",
        "--ca-file",
        str(starttls_auth.ca_file),
        "--user",
        "alice",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--body",
        "secret body",
    ]
    result = run(*common, env={"MAILRELAY_PASSWORD": "pa55 w0rd!"})
    assert result.exit_code == 0, result.output
    assert "accepted bob@example.net" in result.output
    assert starttls_auth.server.recorder.logins == [(b"alice", True)]
    assert len(starttls_auth.server.recorder.messages) == 1

    custom = run(*common, "--password-env", "SMTP_PW", env={"SMTP_PW": "wrong", "MAILRELAY_PASSWORD": None})  # type: ignore[dict-item]
    assert custom.exit_code == 1
    assert "authentication as 'alice' failed: 535" in custom.output
    assert len(starttls_auth.server.recorder.messages) == 1


def test_password_is_never_an_option_and_missing_password_is_a_usage_error(starttls_auth: Tls) -> None:
    result = run("--password", "x", "--from", "a@example.org", "--to", "b@example.net")
    assert result.exit_code == 2 and "No such option '--password'" in result.output
    missing = run(
        "--server",
        starttls_auth.server.address,
        "--user",
        "alice",
        *A_TO_B,
        env={"MAILRELAY_PASSWORD": None},  # type: ignore[dict-item]
    )
    assert missing.exit_code == 2 and "set the environment variable MAILRELAY_PASSWORD" in missing.output


def test_untrusted_certificate_fails_clearly(starttls_auth: Tls) -> None:
    result = run(
        "--server",
        starttls_auth.server.address,
        *A_TO_B,
    )
    assert result.exit_code == 1
    assert "STARTTLS with" in result.output and "CERTIFICATE_VERIFY_FAILED" in result.output
    assert starttls_auth.server.recorder.messages == []


def test_plain_auth_to_a_remote_server_is_refused_before_connecting() -> None:
    result = run(
        "--server",
        "mail.invalid:25",
        "--tls",
        "none",
        "--user",
        "alice",
        *A_TO_B,
        env={"MAILRELAY_PASSWORD": "pw"},
    )
    assert result.exit_code == 1
    assert "refusing to send the password for 'alice' unencrypted to mail.invalid:25" in result.output


def test_smtputf8_is_used_when_offered_and_fails_clearly_when_not(plain: Server) -> None:
    args = ["--tls", "none", "--from", "jörg@exämple.org", "--to", "zoë@example.net", "--body", "x"]
    result = run("--server", plain.address, *args)
    assert result.exit_code == 0, result.output
    [received] = plain.recorder.messages
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == ["zoë@example.net"]

    strict = Server(Recorder(), enable_SMTPUTF8=False)
    try:
        refused = run("--server", strict.address, *args)
    finally:
        strict.stop()
    assert refused.exit_code == 1
    assert "need SMTPUTF8 (RFC 6531)" in refused.output and "does not offer it" in refused.output
    assert strict.recorder.messages == []


def test_eml_is_sent_as_is(plain: Server, tmp_path: Path) -> None:
    eml = tmp_path / "saved.eml"
    content = (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: saved\r\n"
        b"Message-ID: <saved.1@example.org>\r\n\r\n.leading dot\r\nbody\r\n"
    )
    eml.write_bytes(content)
    result = run("--server", plain.address, "--tls", "none", "--eml", str(eml), "--bcc", "extra@example.com")
    assert result.exit_code == 0, result.output
    [received] = plain.recorder.messages
    assert received.content == content
    assert received.rcpt_tos == ["extra@example.com"]
    conflict = run("--eml", str(eml), "--subject", "x")
    assert conflict.exit_code == 2 and "drop --subject" in conflict.output


def test_dry_run_prints_envelope_and_message() -> None:
    dry = run(
        "--dry-run",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.net",
        "--bcc",
        "hidden@example.com",
        "--subject",
        "preview",
        "--header",
        "X-Tag: demo",
        stdin=b"body from stdin\n",
    )
    assert dry.exit_code == 0
    head, _, message = dry.stdout_bytes.partition(b" bytes)\n")
    assert head.splitlines()[:4] == [
        b"# envelope",
        b"MAIL FROM:<alice@example.org>",
        b"RCPT TO:<bob@example.net>",
        b"RCPT TO:<hidden@example.com>",
    ]
    parsed = media.parse(message)
    assert parsed["Subject"] == "preview" and parsed["X-Tag"] == "demo" and "Bcc" not in parsed
    assert parsed.get_content().replace("\r\n", "\n") == "body from stdin\n"


@pytest.mark.parametrize(
    ("args", "advice"),
    [
        (["--to", "b@example.net"], "a sender is needed: --from"),
        (["--from", "a@example.org"], "give at least one --to"),
        (["--from", "a@example.org", "--to", "b@example.net", "--server", "nohost"], "use host:port"),
        (["--from", "a@example.org", "--to", "not-an-address"], "use name@example.com"),
        (["--from", "a@example.org", "--to", "b@example.net", "--header", "Bcc: x@y.z"], "use --bcc"),
        (
            ["--from", "a@example.org", "--to", "b@example.net", "--body", "x", "--body-file", "f"],
            "give the body",
        ),
        (["--from", "a@example.org", "--to", "b@example.net", "--body", "x", "also a body"], "give the body"),
        (["--from", "a@example.org", "--to", "b@example.net", "--body-file", "f", "a body"], "give the body"),
        (["--from", "a@example.org", "--to", "b@example.net", "one", "two"], "unexpected extra argument"),
    ],
)
def test_usage_errors_exit_2_with_advice(args: list[str], advice: str) -> None:
    result = run(*args, "--dry-run", stdin=b"")
    assert result.exit_code == 2
    assert advice in result.output


def test_the_body_as_an_argument_is_delivered(plain: Server) -> None:
    """Issue 6's "a text body (argument, file or stdin)": the command as a user types it."""
    script = Path(sys.executable).with_name("mailrelay")
    done = subprocess.run(
        [
            *(str(script), "send", "--server", plain.address, "--tls", "none"),
            *("--from", "a@example.org", "--to", "bob@example.net", "--subject", "s", "hello body"),
        ],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    [received] = plain.recorder.messages
    parsed = media.parse(received.content)
    assert parsed["Subject"] == "s"
    assert parsed.get_content().replace("\r\n", "\n") == "hello body\n"


def test_an_eml_takes_no_body_argument(tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\n\r\nhi\r\n")
    result = run("--eml", str(eml), "--dry-run", "a body", stdin=b"")
    assert result.exit_code == 2 and "drop --body/BODY" in result.output


def test_console_script_in_a_subprocess_with_progress(plain: Server, tmp_path: Path) -> None:
    """The installed `mailrelay` entry point; a 3 MiB attachment reports progress to 100%."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    script = Path(sys.executable).with_name("mailrelay")
    done = subprocess.run(
        [str(script), "send", *alice_to_bob(plain, "--attach", str(big), "--progress", "--body", "large")],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert b"accepted bob@example.net" in done.stdout
    assert b": 100%" in done.stderr
    [received] = plain.recorder.messages
    [_, attachment] = media.parse(received.content).iter_parts()
    assert attachment.get_payload(decode=True) == big.read_bytes()


# --------------------------------------------------------------------------- through a real relay


async def test_send_through_a_real_relay_to_smtp_and_every_gateway(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    """`mailrelay send` → `mailrelay relay` (subprocess) → an SMTP next hop, a Maildir, a webhook
    and a pipe: each gets the composed bytes plus exactly one Received header; the bcc
    recipient is in no delivered header."""
    sink = await SmtpSink().start()
    posts: list[bytes] = []
    posted = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        posts.append(await request.read())
        posted.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/mail", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_port = runner.addresses[0][1]
    pipe_out = tmp_path / "pipe.out"
    script = tmp_path / "pipe.sh"
    script.write_text(f"#!/bin/sh\ncat > {pipe_out}.tmp && mv {pipe_out}.tmp {pipe_out}\n")
    script.chmod(0o755)
    smtp_port = free_port()

    def route(name: str, domain: str, hop: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "match": {"recipientDomains": [domain]}, "nextHop": hop}

    config = {
        "hostname": "edge.relay.test",
        "listeners": [{"name": "smtp", "host": "127.0.0.1", "port": smtp_port, "mode": "relay"}],
        "trustedNetworks": ["127.0.0.0/8"],
        "queue": {
            "directory": str(tmp_path / "queue"),
            "retry": {"minBackoff": "1s", "maxBackoff": "2s", "maxLifetime": "1h"},
        },
        "routes": [
            route(
                "smtp",
                "example.net",
                {"kind": "relay", "name": "sink", "host": "127.0.0.1", "port": sink.port},
            ),
            route(
                "maildir", "maildir.test", {"kind": "gateway", "maildir": {"path": str(tmp_path / "mail")}}
            ),
            route(
                "hook",
                "hooks.test",
                {"kind": "gateway", "webhook": {"url": f"http://127.0.0.1:{hook_port}/mail"}},
            ),
            route("pipe", "pipe.test", {"kind": "gateway", "pipe": {"command": [str(script)]}}),
        ],
        "metrics": {"host": "127.0.0.1", "port": free_port()},
    }
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump(config))
    relay = RelayRun(config_path).start()
    try:
        await asyncio.to_thread(relay.wait_for, r"ready \(pid")
        args = compose_args(f"127.0.0.1:{smtp_port}", files)
        args[args.index("carol@example.net")] = "carol@maildir.test"
        args[args.index("secret@example.com")] = "secret@hooks.test"
        args += ["--cc", "dave@pipe.test"]
        dry = await asyncio.to_thread(run, *args, "--dry-run")
        composed = dry.stdout_bytes.split(b" bytes)\n", 1)[1]
        result = await asyncio.to_thread(run, *args)
        assert result.exit_code == 0, result.output
        assert len(result.output.splitlines()) == 4

        await asyncio.wait_for(sink.arrived.wait(), 30)
        await asyncio.wait_for(posted.wait(), 30)
        maildir = tmp_path / "mail" / "maildir.test" / "carol"
        await until(
            lambda: pipe_out.exists() and (maildir / "new").is_dir() and any((maildir / "new").iterdir())
        )
    finally:
        relay.kill()
        await sink.stop()
        await runner.cleanup()

    def one_received(content: bytes) -> bytes:
        assert content.startswith(b"Received: from ")
        end = content.index(b"\r\n", content.index(b"by edge.relay.test")) + 2
        while content[end : end + 1] in (b" ", b"\t"):
            end = content.index(b"\r\n", end) + 2
        rest = content[end:]
        assert b"\r\nReceived:" not in b"\r\n" + rest.split(b"\r\n\r\n")[0]
        return rest

    [smtp] = sink.messages
    assert smtp.rcpt_tos == ["bob@example.net"]
    assert one_received(smtp.content) == composed

    box = mailbox.Maildir(str(maildir), factory=None)
    [stored] = [box.get_bytes(key) for key in box.keys()]  # noqa: SIM118
    head = b"Return-Path: <alice@example.org>\nDelivered-To: carol@maildir.test\n"
    assert stored.startswith(head)
    assert one_received(stored[len(head) :].replace(b"\n", b"\r\n")) == composed

    [posted_body] = posts
    document = json.loads(posted_body)
    assert document["envelope"] == {"from": "alice@example.org", "recipients": ["secret@hooks.test"]}
    raw = base64.b64decode(document["raw"])
    assert one_received(raw) == composed
    assert [a["contentType"] for a in document["attachments"]] == ["image/png", "audio/mpeg", "video/mp4"]

    piped = pipe_out.read_bytes()
    assert one_received(piped) == composed

    for delivered in (smtp.content, stored, raw, piped):
        message = media.parse(delivered.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        assert all("secret" not in str(v) for part in message.walk() for v in part.values())
        assert [p.get_content_type() for p in message.iter_parts()][1:] == [
            "image/png",
            "audio/mpeg",
            "video/mp4",
        ]
