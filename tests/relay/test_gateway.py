"""Mail gateways against real components: an aiohttp server on 127.0.0.1 for webhooks (HTTP and
HTTPS with trustme certificates), Maildirs read back with `mailbox.Maildir` (full and read-only
file systems made real with a tiny tmpfs and a read-only bind mount in a private mount
namespace), and real subprocesses for pipe."""

from __future__ import annotations

import asyncio
import base64
import json
import mailbox
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from relay.config import GatewayHop, RelayConfig, parse_config
from relay.core import model
from relay.core.model import DeliveryRequest, Envelope, Message, QueueEntry, Recipient, RecipientOutcome
from relay.gateways import MaildirTransport, build_gateway, folder_name, maildir_for

CONTENT = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>, carol@example.net\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Hallo Bob, sch=C3=B6n.\r\n"
    b"--b1\r\n"
    b"Content-Type: image/png\r\n"
    b'Content-Disposition: attachment; filename="dot.png"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"iVBORw0KGgo=\r\n"
    b"--b1--\r\n"
)
RECIPIENTS = (Recipient("bob@example.net"), Recipient("carol@example.net"))


def make_request(
    recipients: tuple[Recipient, ...] = RECIPIENTS,
    content: bytes = CONTENT,
    sender: str = "alice@example.org",
) -> DeliveryRequest:
    envelope = Envelope(mail_from=sender, recipients=recipients)
    entry = QueueEntry(queue_id="18B3F2A9C1D04E7A3F", envelope=envelope, arrival=0.0, pending=recipients)
    return DeliveryRequest(message=Message(entry=entry, content=content), recipients=recipients)


def relay_config() -> RelayConfig:
    return parse_config({"hostname": "gw.example.org", "listeners": [{"name": "smtp", "port": 2525}]})


def gateway(spec: dict[str, object]) -> model.Transport:
    return build_gateway(GatewayHop.model_validate(spec), relay_config())


def dispositions(outcomes: object) -> list[model.Disposition]:
    assert isinstance(outcomes, list | tuple)
    return [o.disposition for o in outcomes]


# --------------------------------------------------------------------------- webhook


@dataclass
class Hook:
    """A real HTTP server recording every POST it gets."""

    base: str = ""
    posts: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    flaky_calls: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


async def _start(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner


def _port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


def _hook_app(hook: Hook) -> web.Application:
    async def record(request: web.Request) -> None:
        hook.posts.append((request.path, dict(request.headers), await request.read()))

    async def ok(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=202, text="queued")

    async def gone(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=404, text="no such mailbox")

    async def busy(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=503, text="try later")

    async def flaky(request: web.Request) -> web.Response:
        await record(request)
        hook.flaky_calls += 1
        if hook.flaky_calls == 1:
            return web.Response(status=500, text="database down")
        return web.Response(status=200, text="ok")

    async def private(request: web.Request) -> web.Response:
        await record(request)
        if request.headers.get("Authorization") != "Bearer s3cret-token":
            return web.Response(status=401, text="who are you")
        return web.Response(status=204)

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        await hook.release.wait()
        return web.Response(status=200)

    app = web.Application()
    for path, handler in (
        ("/ok", ok),
        ("/gone", gone),
        ("/busy", busy),
        ("/flaky", flaky),
        ("/private", private),
        ("/slow", slow),
    ):
        app.router.add_post(path, handler)
    return app


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    state = Hook()
    runner = await _start(_hook_app(state))
    state.base = f"http://127.0.0.1:{_port(runner)}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


async def _post(hook_url: str, **options: object) -> list[RecipientOutcome]:
    transport = gateway({"webhook": {"url": hook_url, **options}})
    try:
        return list(await transport.deliver(make_request()))
    finally:
        await transport.close()


async def test_webhook_json_2xx_delivers_with_envelope_headers_body_and_raw(hook: Hook) -> None:
    outcomes = await _post(hook.base + "/ok")
    assert [o.recipient.address for o in outcomes] == ["bob@example.net", "carol@example.net"]
    assert dispositions(outcomes) == [model.Disposition.DELIVERED] * 2
    assert outcomes[0].code == 250 and outcomes[0].remote_mta == "127.0.0.1"
    assert "HTTP 202" in outcomes[0].text
    [(path, headers, body)] = hook.posts
    assert path == "/ok" and headers["Content-Type"].startswith("application/json")
    document = json.loads(body)
    assert document["version"] == 1
    assert document["queueId"] == "18B3F2A9C1D04E7A3F"
    assert document["envelope"] == {
        "from": "alice@example.org",
        "recipients": ["bob@example.net", "carol@example.net"],
    }
    assert ["Subject", "Grüße"] in document["headers"]
    assert document["subject"] == "Grüße"
    assert document["text"] == "Hallo Bob, schön."
    assert document["html"] is None
    assert document["attachments"] == [{"filename": "dot.png", "contentType": "image/png", "size": 8}]
    assert base64.b64decode(document["raw"]) == CONTENT
    assert document["size"] == len(CONTENT)
    assert "Authorization" not in headers


async def test_webhook_rfc822_posts_the_raw_message_with_envelope_headers(hook: Hook) -> None:
    transport = gateway({"webhook": {"url": hook.base + "/ok", "format": "rfc822"}})
    request = make_request(recipients=(Recipient("bob@example.net"), Recipient("jörg@exämple.net")))
    outcomes = await transport.deliver(request)
    await transport.close()
    assert dispositions(outcomes) == [model.Disposition.DELIVERED] * 2
    [(_, headers, body)] = hook.posts
    assert body == CONTENT
    assert headers["Content-Type"] == "message/rfc822"
    assert headers["X-Mailrelay-From"] == "alice@example.org"
    assert headers["X-Mailrelay-To"] == "bob@example.net,j%C3%B6rg@ex%C3%A4mple.net"
    assert headers["X-Mailrelay-Queue-Id"] == "18B3F2A9C1D04E7A3F"


async def test_webhook_4xx_bounces_with_the_http_status(hook: Hook) -> None:
    outcomes = await _post(hook.base + "/gone")
    assert dispositions(outcomes) == [model.Disposition.BOUNCED] * 2
    assert outcomes[0].code == 550 and outcomes[0].status == "5.0.0"
    assert outcomes[0].text == "webhook answered HTTP 404 Not Found: no such mailbox"


async def test_webhook_5xx_defers(hook: Hook) -> None:
    outcomes = await _post(hook.base + "/busy")
    assert dispositions(outcomes) == [model.Disposition.DEFERRED] * 2
    assert outcomes[0].code == 451 and outcomes[0].status.startswith("4.")
    assert "HTTP 503" in outcomes[0].text and "try later" in outcomes[0].text


async def test_webhook_that_fails_then_recovers_delivers_on_the_second_attempt(hook: Hook) -> None:
    transport = gateway({"webhook": {"url": hook.base + "/flaky"}})
    first = await transport.deliver(make_request())
    second = await transport.deliver(make_request())
    await transport.close()
    assert dispositions(first) == [model.Disposition.DEFERRED] * 2
    assert "HTTP 500" in first[0].text and "database down" in first[0].text
    assert dispositions(second) == [model.Disposition.DELIVERED] * 2
    assert len(hook.posts) == 2 and hook.posts[0][2] == hook.posts[1][2]


async def test_webhook_connection_refused_defers() -> None:
    runner = await _start(web.Application())
    port = _port(runner)
    await runner.cleanup()  # nothing listens on this port any more
    outcomes = await _post(f"http://127.0.0.1:{port}/ok")
    assert dispositions(outcomes) == [model.Disposition.DEFERRED] * 2
    assert outcomes[0].status == "4.4.1" and "connection failed" in outcomes[0].text


async def test_webhook_sends_the_authorization_header_from_the_secret_file(
    hook: Hook, tmp_path: Path
) -> None:
    secret = tmp_path / "authorization"
    secret.write_text("Bearer s3cret-token\n")
    outcomes = await _post(hook.base + "/private", authHeaderFile=str(secret))
    assert dispositions(outcomes) == [model.Disposition.DELIVERED] * 2
    assert hook.posts[0][1]["Authorization"] == "Bearer s3cret-token"
    # Without it the endpoint answers 401: a bounce that names the status.
    refused = await _post(hook.base + "/private")
    assert dispositions(refused) == [model.Disposition.BOUNCED] * 2 and "HTTP 401" in refused[0].text
    # An unreadable secret is a configuration problem: defer, never bounce.
    missing = await _post(hook.base + "/private", authHeaderFile=str(tmp_path / "absent"))
    assert dispositions(missing) == [model.Disposition.DEFERRED] * 2 and missing[0].status == "4.3.5"


async def test_webhook_timeout_defers(hook: Hook) -> None:
    outcomes = await _post(hook.base + "/slow", timeout="300ms")
    assert dispositions(outcomes) == [model.Disposition.DEFERRED] * 2
    assert "timed out" in outcomes[0].text


async def test_webhook_https_verifies_the_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    state = Hook()
    runner = await _start(_hook_app(state), ssl_context=server_ssl)
    url = f"https://127.0.0.1:{_port(runner)}/ok"
    try:
        untrusted = await _post(url)  # the system store does not know the test CA
        trusted = await _post(url, caFile=str(ca_file))
        skipped = await _post(url, insecureSkipVerify=True)
    finally:
        await runner.cleanup()
    assert dispositions(untrusted) == [model.Disposition.DEFERRED] * 2
    assert "certificate" in untrusted[0].text
    assert dispositions(trusted) == [model.Disposition.DELIVERED] * 2
    assert dispositions(skipped) == [model.Disposition.DELIVERED] * 2
    assert len(state.posts) == 2


# --------------------------------------------------------------------------- maildir


def _names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def _read_maildir(path: Path) -> list[bytes]:
    box = mailbox.Maildir(str(path), factory=None, create=False)
    return [box.get_bytes(key) for key in sorted(box.keys())]


async def test_maildir_per_recipient_folders_read_back_with_mailbox(tmp_path: Path) -> None:
    transport = gateway({"maildir": {"path": str(tmp_path)}})
    recipients = (Recipient("bob@Example.NET"), Recipient("carol@example.net"), Recipient("dan@other.org"))
    outcomes = await transport.deliver(make_request(recipients=recipients))
    assert dispositions(outcomes) == [model.Disposition.DELIVERED] * 3
    assert _names(tmp_path) == ["example.net", "other.org"]
    for address, folder in (
        ("bob@Example.NET", tmp_path / "example.net" / "bob"),
        ("carol@example.net", tmp_path / "example.net" / "carol"),
        ("dan@other.org", tmp_path / "other.org" / "dan"),
    ):
        [stored] = _read_maildir(folder)
        expected = b"Return-Path: <alice@example.org>\nDelivered-To: " + address.encode() + b"\n"
        assert stored == expected + CONTENT.replace(b"\r\n", b"\n")
        assert _names(folder / "tmp") == []
        parsed = mailbox.Maildir(str(folder), create=False)
        [message] = parsed.values()
        assert message["Delivered-To"] == address and message["Subject"] == "=?utf-8?q?Gr=C3=BC=C3=9Fe?="


async def test_maildir_single_layout_keeps_one_copy_per_recipient(tmp_path: Path) -> None:
    transport = gateway({"maildir": {"path": str(tmp_path / "box"), "layout": "single"}})
    outcomes = await transport.deliver(make_request())
    assert dispositions(outcomes) == [model.Disposition.DELIVERED] * 2
    stored = _read_maildir(tmp_path / "box")
    assert len(stored) == 2
    delivered_to = sorted(mailbox.MaildirMessage(b)["Delivered-To"] for b in stored)
    assert delivered_to == ["bob@example.net", "carol@example.net"]


def test_folder_names_cannot_escape_the_maildir_root(tmp_path: Path) -> None:
    config = GatewayHop.model_validate({"maildir": {"path": str(tmp_path)}}).maildir
    assert config is not None
    assert folder_name("..") == "%2E."
    assert folder_name("a/b") == "a%2Fb"
    assert maildir_for(config, '"../../etc"@example.net') == tmp_path / "example.net" / '"..%2F..%2Fetc"'
    assert maildir_for(config, "jörg@exämple.net") == tmp_path / "exämple.net" / "jörg"


_MOUNT_HELPER = textwrap.dedent(
    """
    import asyncio, json, sys
    from relay.config import GatewayHop, parse_config
    from relay.gateways import build_gateway
    from relay.core.model import DeliveryRequest, Envelope, Message, QueueEntry, Recipient

    path, size = sys.argv[1], int(sys.argv[2])
    rcpt = (Recipient("bob@example.net"),)
    env = Envelope("alice@example.org", rcpt)
    entry = QueueEntry("Q1", env, 0.0, rcpt)
    content = b"Subject: big\\r\\n\\r\\n" + b"x" * size + b"\\r\\n"
    config = parse_config({"hostname": "gw", "listeners": [{"name": "smtp", "port": 2525}]})
    transport = build_gateway(GatewayHop.model_validate({"maildir": {"path": path}}), config)
    outcomes = asyncio.run(transport.deliver(DeliveryRequest(Message(entry, content), rcpt)))
    import os
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    print(json.dumps({"outcomes": [o.to_json() for o in outcomes], "files": files}))
    """
)


def _in_mount_namespace(tmp_path: Path, setup: str, size: int) -> tuple[list[RecipientOutcome], list[str]]:
    """Run a maildir delivery in a private mount namespace after `setup` (shell, as root)."""
    helper = tmp_path / "helper.py"
    helper.write_text(_MOUNT_HELPER)
    box = tmp_path / "box"
    box.mkdir(exist_ok=True)
    script = f"set -e; {setup}; exec {sys.executable} {helper} {box} {size}"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return [RecipientOutcome.from_json(o) for o in result["outcomes"]], result["files"]


needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a real ENOSPC/EROFS needs root and unshare (private mount namespace); see the "
    "injected-error test below for the same code path",
)


@needs_mount_namespace
def test_maildir_on_a_full_disk_defers_and_leaves_no_partial_file(tmp_path: Path) -> None:
    box = tmp_path / "box"
    outcomes, files = _in_mount_namespace(tmp_path, f"mount -t tmpfs -o size=64k tmpfs {box}", 256 * 1024)
    [outcome] = outcomes
    assert outcome.disposition is model.Disposition.DEFERRED
    assert (outcome.code, outcome.status) == (452, "4.3.1")
    assert "full" in outcome.text and "No space left on device" in outcome.text
    assert files == []  # the partial tmp file was removed; nothing half-written in new/


@needs_mount_namespace
def test_maildir_on_a_read_only_file_system_defers(tmp_path: Path) -> None:
    box = tmp_path / "box"
    outcomes, files = _in_mount_namespace(
        tmp_path, f"mount --bind {box} {box}; mount -o remount,bind,ro {box}", size=10
    )
    [outcome] = outcomes
    assert files == []
    assert outcome.disposition is model.Disposition.DEFERRED
    assert (outcome.code, outcome.status) == (451, "4.3.0")
    assert "Read-only file system" in outcome.text
    assert not list(box.iterdir())


async def test_maildir_write_errors_defer_every_recipient(tmp_path: Path) -> None:
    """Any OSError at the write (here an injected EIO and EDQUOT) defers; nothing is lost."""
    config = GatewayHop.model_validate({"maildir": {"path": str(tmp_path)}}).maildir
    assert config is not None

    class Failing(MaildirTransport):
        def write(self, folder: Path, data: bytes) -> Path:
            if "bob" in str(folder):
                raise OSError(5, "Input/output error")
            raise OSError(122, "Disk quota exceeded")

    outcomes = await Failing(config, hostname="gw").deliver(make_request())
    assert dispositions(outcomes) == [model.Disposition.DEFERRED] * 2
    assert outcomes[0].status == "4.3.0" and "Input/output error" in outcomes[0].text
    assert outcomes[1].status == "4.3.1" and outcomes[1].code == 452


# --------------------------------------------------------------------------- pipe


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "deliver.sh"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


async def test_pipe_exit_0_delivers_with_message_on_stdin_and_envelope_in_environment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = _script(
        tmp_path,
        f"""
        cat > {out}.msg
        printf '%s|%s|%s|%s' "$MAILRELAY_SENDER" "$MAILRELAY_RECIPIENTS" \\
            "$MAILRELAY_QUEUE_ID" "$1" > {out}.env
        """,
    )
    transport = gateway({"pipe": {"command": [str(script), "--from={sender}"]}})
    outcomes = await transport.deliver(make_request())
    assert dispositions(outcomes) == [model.Disposition.DELIVERED] * 2
    assert _read(f"{out}.msg") == CONTENT
    assert _read(f"{out}.env").decode() == (
        "alice@example.org|bob@example.net,carol@example.net|18B3F2A9C1D04E7A3F|--from=alice@example.org"
    )


async def test_pipe_with_recipient_placeholder_runs_once_per_recipient(tmp_path: Path) -> None:
    log = tmp_path / "log"
    script = _script(
        tmp_path,
        f"""
        cat > /dev/null
        echo "$1 $MAILRELAY_RECIPIENT" >> {log}
        [ "$1" = carol@example.net ] && {{ echo "mailbox carol is locked" >&2; exit 75; }}
        exit 0
        """,
    )
    transport = gateway({"pipe": {"command": [str(script), "{recipient}"]}})
    outcomes = await transport.deliver(make_request())
    assert dispositions(outcomes) == [model.Disposition.DELIVERED, model.Disposition.DEFERRED]
    assert "mailbox carol is locked" in outcomes[1].text
    assert log.read_text().splitlines() == [
        "bob@example.net bob@example.net",
        "carol@example.net carol@example.net",
    ]


async def test_pipe_exit_75_defers(tmp_path: Path) -> None:
    script = _script(tmp_path, "cat >/dev/null; echo 'backend busy' >&2; exit 75\n")
    outcomes = await gateway({"pipe": {"command": [str(script)]}}).deliver(make_request())
    assert dispositions(outcomes) == [model.Disposition.DEFERRED] * 2
    assert outcomes[0].code == 451 and outcomes[0].status == "4.3.0"
    assert "exited 75" in outcomes[0].text and "backend busy" in outcomes[0].text


async def test_pipe_other_exit_bounces_with_truncated_stderr(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        "cat >/dev/null; echo 'user bob unknown' >&2; head -c 5000 /dev/zero | tr '\\0' 'y' >&2; exit 1\n",
    )
    outcomes = await gateway({"pipe": {"command": [str(script)]}}).deliver(make_request())
    assert dispositions(outcomes) == [model.Disposition.BOUNCED] * 2
    assert outcomes[0].code == 554 and outcomes[0].status == "5.3.0"
    assert outcomes[0].text.startswith("pipe command exited 1: user bob unknown yyy")
    assert len(outcomes[0].text) < 500 and outcomes[0].text.endswith("...")


async def test_pipe_that_does_not_read_stdin_still_gets_an_outcome(tmp_path: Path) -> None:
    script = _script(tmp_path, "exit 0\n")
    big = CONTENT + b"z" * (4 * 1024 * 1024) + b"\r\n"
    outcomes = await gateway({"pipe": {"command": [str(script)]}}).deliver(make_request(content=big))
    assert dispositions(outcomes) == [model.Disposition.DELIVERED] * 2


async def test_pipe_timeout_kills_the_process_group_and_defers(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = _script(tmp_path, f"sleep 300 & echo $! > {pidfile}; wait\n")
    outcomes = await gateway({"pipe": {"command": [str(script)], "timeout": "500ms"}}).deliver(make_request())
    assert dispositions(outcomes) == [model.Disposition.DEFERRED] * 2
    assert "timed out" in outcomes[0].text
    child = int(_read(pidfile))
    for _ in range(100):  # SIGKILL is delivered asynchronously: on a loaded machine, wait for it
        if _gone_or_zombie(child):
            break
        await asyncio.sleep(0.05)
    assert _gone_or_zombie(child), "the grandchild survived the timeout"


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def test_pipe_missing_command_defers(tmp_path: Path) -> None:
    outcomes = await gateway({"pipe": {"command": [str(tmp_path / "nope")]}}).deliver(make_request())
    assert dispositions(outcomes) == [model.Disposition.DEFERRED] * 2 and outcomes[0].status == "4.3.5"
