"""Interop with clients nobody here wrote: swaks (PIPELINING, STARTTLS with certificate
verification against a trustme CA, AUTH PLAIN and LOGIN, an 8-bit body) and Python's smtplib
(SIZE, BODY=8BITMIME, SMTPUTF8, RFC 3461 DSN parameters, STARTTLS + AUTH). One mailrelay
process: a relay listener that accepts mail for example.com from anyone, and a submission
listener (STARTTLS, AUTH required) whose users may send anywhere. The next hop is an aiosmtpd
sink that advertises DSN and records the parameters it is given."""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.doctor import find, require
from tests.faults.harness import Relay, record_figures, relay_config
from tests.relay.apphelp import free_port
from tests.relay.fronthelp import Certs, make_certs, write_users
from tests.relay.smtpsink import Received, SmtpSink

PASSWORD = "s3cret pass"
RESULTS: dict[str, int] = {"swaks_sessions": 0, "smtplib_sessions": 0}


@dataclass
class Env:
    relay: Relay
    sink: SmtpSink
    loop: asyncio.AbstractEventLoop
    certs: Certs
    submission_port: int

    def wait_for(self, token: str, timeout: float = 60.0) -> Received:
        async def arrived() -> Received:
            async with asyncio.timeout(timeout):
                while True:
                    for message in self.sink.messages:
                        if f"X-Token: {token}".encode() in message.content:
                            return message
                    self.sink.arrived.clear()
                    await self.sink.arrived.wait()

        future: Future[Received] = asyncio.run_coroutine_threadsafe(arrived(), self.loop)
        return future.result(timeout + 5)

    def tokens(self) -> list[str]:
        return [
            m.group(1).decode() for x in self.sink.messages if (m := re.search(rb"X-Token: (\S+)", x.content))
        ]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("clients")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def in_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    async def make_sink() -> SmtpSink:
        return await SmtpSink(dsn=True).start()

    sink = in_loop(make_sink())
    certs = make_certs(tmp)
    users = write_users(tmp, {"alice": PASSWORD})
    submission_port = free_port()
    config = relay_config(
        tmp,
        smtp_port=free_port(),
        trusted=[],
        next_hop_port=sink.port,
        tls=certs.tls,
        auth={"usersFile": str(users)},
        hostname="relay.clients.test",
        submission_port=submission_port,
    )
    relay = Relay(tmp, config).start()
    try:
        yield Env(relay, sink, loop, certs, submission_port)
    finally:
        relay.stop()
        in_loop(sink.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# ----------------------------------------------------------------------------- swaks


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real swaks; a test that needs it fails with the install hint when it is missing
    (or, for --tls, when Perl's Net::SSLeay is), never skips (tests/doctor.py)."""
    require("swaks", *(["swaks-tls"] if "--tls" in args else []))
    binary = find("swaks")
    assert binary is not None
    RESULTS["swaks_sessions"] += 1
    return subprocess.run([binary, "--timeout", "60", *args], capture_output=True, text=True, timeout=120)


def test_swaks_pipelining(env: Env) -> None:
    result = swaks(
        "--server", "127.0.0.1", "--port", str(env.relay.port), "--pipeline",
        "--from", "sender@sender.test", "--to", "user@example.com,other@example.com",
        "--header", "X-Token: swaks-pipeline", "--body", "pipelined",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PIPELINING" in result.stdout
    received = env.wait_for("swaks-pipeline")
    assert sorted(received.rcpt_tos) == ["other@example.com", "user@example.com"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_starttls_verified_and_auth(env: Env, mechanism: str) -> None:
    token = f"swaks-auth-{mechanism.lower()}"
    body = "8-bit body: Grüße, ½ € ✓"
    result = swaks(
        "--server", "127.0.0.1", "--port", str(env.submission_port),
        "--tls", "--tls-verify", "--tls-ca-path", str(env.certs.ca_file), "--tls-sni", "localhost",
        "--auth", mechanism, "--auth-user", "alice", "--auth-password", PASSWORD,
        "--from", "alice@sender.test", "--to", "someone@elsewhere.test",
        "--header", f"X-Token: {token}", "--body", body,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    received = env.wait_for(token)
    assert received.rcpt_tos == ["someone@elsewhere.test"]  # an authenticated user may relay
    assert body.encode() in received.content
    assert re.search(rb"with ESMTPSA id", received.content)


def test_swaks_auth_without_tls_is_refused(env: Env) -> None:
    result = swaks(
        "--server", "127.0.0.1", "--port", str(env.submission_port),
        "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD,
        "--from", "alice@sender.test", "--to", "someone@elsewhere.test",
        "--header", "X-Token: swaks-cleartext",
    )  # fmt: skip
    assert result.returncode != 0
    assert "swaks-cleartext" not in env.tokens()


def test_swaks_wrong_ca_fails_verification(env: Env, tmp_path: Path) -> None:
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    result = swaks(
        "--server", "127.0.0.1", "--port", str(env.submission_port),
        "--tls", "--tls-verify", "--tls-ca-path", str(other), "--tls-sni", "localhost",
        "--from", "alice@sender.test", "--to", "someone@elsewhere.test", "--header", "X-Token: swaks-bad-ca",
    )  # fmt: skip
    assert result.returncode != 0  # the relay's certificate really is what was verified above
    assert "swaks-bad-ca" not in env.tokens()


# ----------------------------------------------------------------------------- smtplib


def test_smtplib_size_8bitmime_smtputf8_and_dsn(env: Env) -> None:
    msg = EmailMessage()
    msg["From"] = "josé@sender.test"
    msg["To"] = "user@example.com"
    msg["Subject"] = "smtplib"
    msg["X-Token"] = "smtplib-ext"
    msg.set_content("Ünïcödé body\n", cte="8bit")
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n", utf8=True))
    RESULTS["smtplib_sessions"] += 1
    with smtplib.SMTP("127.0.0.1", env.relay.port, timeout=60) as client:
        client.ehlo("client.test")
        for extension in ("size", "8bitmime", "smtputf8", "dsn", "pipelining", "enhancedstatuscodes"):
            assert client.has_extn(extension), extension
        assert int(client.esmtp_features["size"]) == 25 * 1024 * 1024
        client.sendmail(
            "josé@sender.test",
            ["user@example.com"],
            data,
            mail_options=["SMTPUTF8", "BODY=8BITMIME", "RET=FULL", "ENVID=env+2Bid"],  # smtplib adds SIZE
            rcpt_options=["NOTIFY=DELAY,FAILURE", "ORCPT=rfc822;user@example.com"],
        )
    received = env.wait_for("smtplib-ext")
    assert received.mail_from == "josé@sender.test"
    assert {o.upper() for o in received.mail_options} >= {"SMTPUTF8", "BODY=8BITMIME"}
    assert received.dsn_mail == {"RET": "FULL", "ENVID": "env+2Bid"}
    assert received.dsn_rcpt["user@example.com"] == {
        "NOTIFY": "DELAY,FAILURE",
        "ORCPT": "rfc822;user@example.com",
    }
    assert "Ünïcödé body".encode() in received.content


def test_smtplib_declared_size_over_the_limit_is_refused_at_mail(env: Env) -> None:
    RESULTS["smtplib_sessions"] += 1
    with smtplib.SMTP("127.0.0.1", env.relay.port, timeout=60) as client:
        client.ehlo("client.test")
        code, text = client.mail("sender@sender.test", options=[f"SIZE={26 * 1024 * 1024}"])
        assert (code, text.split()[0]) == (552, b"5.3.4")


def test_smtplib_starttls_and_login(env: Env) -> None:
    context = ssl.create_default_context(cafile=str(env.certs.ca_file))
    RESULTS["smtplib_sessions"] += 1
    with smtplib.SMTP("localhost", env.submission_port, timeout=60) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")  # not before TLS
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail(
                "alice@sender.test", ["x@elsewhere.test"], b"X-Token: smtplib-noauth\r\n\r\nx\r\n"
            )
        client.starttls(context=context)
        client.ehlo("client.test")
        client.login("alice", PASSWORD)
        client.sendmail("alice@sender.test", ["x@elsewhere.test"], b"X-Token: smtplib-auth\r\n\r\nhello\r\n")
    received = env.wait_for("smtplib-auth")
    assert received.rcpt_tos == ["x@elsewhere.test"]
    assert "smtplib-noauth" not in env.tokens()


def test_no_traceback_and_figures(env: Env) -> None:
    process = env.relay.run.process
    crashes = int(process is None or process.poll() is not None)
    tracebacks = env.relay.log().count("Traceback")
    record_figures(
        "peers.clients",
        **RESULTS,
        delivered=len(env.sink.messages),
        crashes=crashes,
        tracebacks_in_log=tracebacks,
    )
    env.relay.assert_no_traceback()
    assert crashes == 0
