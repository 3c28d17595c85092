"""The SMTP front on real loopback sockets with a real spool: smtplib, aiosmtplib and a raw byte
client against every rule of issue 2's "Accepting mail"."""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import ssl
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import uvloop

from relay.front import Front
from relay.scheduler import Scheduler
from relay.spool import Spool, SpoolFullError, SpoolReadOnlyError
from tests.relay.fronthelp import RawClient, make_certs, make_config, running_front, tls_config
from tests.relay.smtpsink import SmtpSink

MESSAGE = b"Subject: hello\r\nFrom: a@sender.org\r\n\r\nbody line\r\n"


def stored(front: Front) -> list[bytes]:
    spool = front.spool
    out = []
    for queue_id in spool.ids("incoming"):
        found = spool.read(queue_id)
        assert found is not None
        out.append(found[1].content)
    return out


async def session(front: Front, listener: str = "smtp") -> RawClient:
    host, port = front.addresses[listener]
    client = await RawClient.connect(host, port)
    code, text = await client.reply()
    assert code == 220 and text.startswith("relay.test ")
    return client


async def transaction(client: RawClient, rcpt: str = "u@example.com") -> None:
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@sender.org>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354


# ----------------------------------------------------------------------------- basics


async def test_ehlo_keywords_and_smtplib_delivery(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"maxMessageSize": "1Mi"})
    async with running_front(config) as front:
        client = await session(front)
        code, text = await client.cmd("EHLO client.test")
        assert code == 250
        keywords = text.splitlines()
        assert keywords[0] == "relay.test"
        for keyword in ("SIZE 1048576", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"):
            assert keyword in keywords
        assert "STARTTLS" not in keywords and not any(k.startswith("AUTH") for k in keywords)
        assert await client.cmd("NOOP") == (250, "2.0.0 OK")
        assert (await client.cmd("QUIT"))[0] == 221
        await client.close()

        host, port = front.addresses["smtp"]

        def send() -> dict[str, Any]:
            with smtplib.SMTP(host, port) as smtp:
                return smtp.sendmail("a@sender.org", ["u@example.com"], MESSAGE)

        assert await asyncio.to_thread(send) == {}
        [content] = stored(front)
        # exactly one new Received header, at the top, then the message unchanged
        assert content.startswith(b"Received: from ")
        assert content.count(b"Received:") == 1
        assert content.endswith(MESSAGE)
        assert b"by relay.test (mailrelay) with ESMTP id " in content
        assert b"for <u@example.com>;" in content


async def test_dsn_and_mime_parameters_are_recorded(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running_front(config) as front:
        host, port = front.addresses["smtp"]
        smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False)
        await smtp.connect()
        errors, _ = await smtp.sendmail(
            "a@sender.org",
            ["u@example.com", "ü@example.com"],
            "Subject: ü\r\n\r\nbödy\r\n".encode(),
            mail_options=["BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=env+2B1"],
            rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;u@example.com"],
        )
        await smtp.quit()
        assert errors == {}
        [queue_id] = front.spool.ids("incoming")
        found = front.spool.read(queue_id)
        assert found is not None
        entry = found[1].entry
        envelope = entry.envelope
        assert (envelope.body, envelope.smtputf8, envelope.ret, envelope.envid) == (
            "8BITMIME",
            True,
            "HDRS",
            "env+2B1",
        )
        assert [r.address for r in envelope.recipients] == ["u@example.com", "ü@example.com"]
        assert envelope.recipients[0].notify == ("FAILURE", "DELAY")
        assert envelope.recipients[0].orcpt == "rfc822;u@example.com"
        assert entry.pending == envelope.recipients
        assert entry.client_address == "127.0.0.1" and entry.helo
        assert b"with UTF8SMTP id" in found[1].content


async def test_pipelined_commands_are_answered_in_order(tmp_path: Path) -> None:
    async with running_front(make_config(tmp_path)) as front:
        client = await session(front)
        await client.send(
            b"EHLO client.test\r\nMAIL FROM:<a@sender.org>\r\nRCPT TO:<one@example.com>\r\n"
            b"RCPT TO:<victim@evil.com>\r\nRCPT TO:<two@example.com>\r\nRCPT TO:<>\r\nDATA\r\n"
        )
        codes = [(await client.reply())[0] for _ in range(7)]
        assert codes == [250, 250, 250, 554, 250, 501, 354]
        await client.send(MESSAGE + b".\r\nNOOP\r\nQUIT\r\n")
        assert [(await client.reply())[0] for _ in range(3)] == [250, 250, 221]
        [content] = stored(front)
        assert b"for <" not in content  # two recipients: no "for" clause


# ----------------------------------------------------------------------------- no open relay


async def test_relay_permission_on_the_wire(tmp_path: Path) -> None:
    async with running_front(make_config(tmp_path)) as front:
        client = await session(front)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@sender.org>")
        probes = {
            "victim@evil.com": "554 5.7.1",
            "victim%evil.com@example.com": "550 5.7.1",
            "evil.com!victim@example.com": "550 5.7.1",
            '"victim@evil.com"@example.com': "550 5.7.1",
            "@example.com:victim@evil.com": "554 5.7.1",
            "victim@[127.0.0.1]": "554 5.7.1",
            "victim@localhost": "554 5.7.1",
            "victim@evil.com@example.com": "550 5.7.1",
            "ok@example.com": "250 2.1.5",
        }
        for rcpt, expected in probes.items():
            code, text = await client.cmd(f"RCPT TO:<{rcpt}>")
            assert f"{code} {text.split()[0]}" == expected, rcpt
        await client.close()
    trusted = make_config(tmp_path, trustedNetworks=["127.0.0.0/8"])
    async with running_front(trusted) as front:
        client = await session(front)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@sender.org>")
        assert (await client.cmd("RCPT TO:<victim@evil.com>"))[0] == 250
        await client.close()


async def test_reject_route_refuses_at_rcpt_and_unrouted_recipients_are_refused(tmp_path: Path) -> None:
    routes = [
        {
            "name": "block",
            "priority": 10,
            "match": {"recipientDomains": ["blocked.example.com"]},
            "nextHop": {"kind": "reject", "code": 550, "message": "5.7.1 Mail to this domain is blocked"},
        },
        {"name": "main", "match": {"recipientDomains": ["example.com"]}, "nextHop": {"kind": "mx"}},
    ]
    config = make_config(
        tmp_path, acceptDomains=["example.com", "blocked.example.com", "other.example"], routes=routes
    )
    async with running_front(config) as front:
        client = await session(front)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@sender.org>")
        assert await client.cmd("RCPT TO:<x@blocked.example.com>") == (
            550,
            "5.7.1 Mail to this domain is blocked",
        )
        assert (await client.cmd("RCPT TO:<x@other.example>"))[:1] == (550,)
        assert (await client.cmd("RCPT TO:<x@example.com>"))[0] == 250
        await client.close()


async def test_bare_postmaster_is_accepted_from_anyone(tmp_path: Path) -> None:
    """RFC 5321 4.5.1: RCPT TO:<Postmaster> without a domain MUST be accepted; the relay routes
    it as postmaster@ its first plain accept domain."""
    async with running_front(make_config(tmp_path)) as front:
        client = await session(front)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@sender.org>")
        assert (await client.cmd("RCPT TO:<Postmaster>"))[0] == 250
        assert (await client.cmd("RCPT TO:<postmaster>"))[0] == 250  # the same mailbox, once
        assert (await client.cmd("RCPT TO:<webmaster>"))[0] == 553
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(MESSAGE + b".\r\n")
        assert (await client.reply())[0] == 250
        await client.close()
        [queue_id] = front.spool.ids("incoming")
        found = front.spool.read(queue_id)
        assert found is not None
        assert [r.address for r in found[1].entry.envelope.recipients] == ["postmaster@example.com"]


# ----------------------------------------------------------------------------- syntax hardening


async def test_command_syntax_hardening(tmp_path: Path) -> None:
    async with running_front(make_config(tmp_path, limits={"maxErrors": 50})) as front:
        client = await session(front)
        assert (await client.cmd("MAIL FROM:<a@sender.org>"))[0] == 503  # no EHLO yet
        await client.cmd("EHLO client.test")
        assert (await client.cmd("RCPT TO:<u@example.com>"))[0] == 503  # no MAIL yet
        await client.send(b"MAIL FROM:<a@sender.org>\rNOOP\r\n")
        assert (await client.reply())[0] == 501
        assert (await client.cmd(b"MAIL FROM:<a\x00b@sender.org>"))[0] == 501
        assert (await client.cmd(b"MAIL FROM:<a\x7fb@sender.org>"))[0] == 501
        assert (await client.cmd(b"MAIL FROM:<a@sender.org> SIZE=10 FOO=1"))[0] == 555
        assert (await client.cmd("MAIL FROM:<a@sender.org>"))[0] == 250
        assert (await client.cmd("MAIL FROM:<a@sender.org>"))[0] == 503  # nested
        assert (await client.cmd("RCPT TO:<>")) == (501, "5.1.3 The null address is not a valid recipient")
        assert (await client.cmd("DATA"))[0] == 503  # no recipient yet
        assert (await client.cmd("NOOP " + "x" * 3000))[0] == 500
        assert (await client.cmd("XYZZY"))[0] == 500
        assert (await client.cmd(""))[0] == 500
        await client.close()


async def test_bare_lf_in_a_command_refuses_and_disconnects(tmp_path: Path) -> None:
    async with running_front(make_config(tmp_path)) as front:
        client = await session(front)
        await client.cmd("EHLO client.test")
        await client.send(b"MAIL FROM:<a@sender.org>\nRCPT TO:<u@example.com>\r\n")
        code, text = await client.reply()
        assert (code, text.split()[0]) == (501, "5.5.2")
        assert await client.closed()


@pytest.mark.parametrize(
    "smuggled",
    [
        b"\n.\n",
        b"\r.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\r.\r\n",
        b"\n..\n",
    ],
)
async def test_smuggling_never_yields_a_second_message(tmp_path: Path, smuggled: bytes) -> None:
    async with running_front(make_config(tmp_path)) as front:
        client = await session(front)
        await transaction(client)
        payload = (
            b"Subject: one\r\n\r\nfirst"
            + smuggled
            + b"MAIL FROM:<evil@sender.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            + b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n"
        )
        await client.send(payload)
        code, text = await client.reply()
        assert code == 250, text
        # The smuggled commands were content, not commands: the next reply answers our NOOP.
        assert await client.cmd("NOOP") == (250, "2.0.0 OK")
        [content] = stored(front)
        assert b"Subject: smuggled" in content
        body = content.split(b"\r\n\r\n", 1)[1]
        assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")  # no bare CR/LF
        assert b"\x00" not in body
        await client.close()


async def test_content_refusals(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"maxMessageSize": "2Ki", "maxHops": 5})
    async with running_front(config) as front:
        client = await session(front)
        cases = [
            (b"Subject: x\r\n\r\nnul\x00here\r\n", "554 5.6.0"),
            (b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n", "554 5.6.0"),
            (b"Subject: x\r\n\r\n" + (b"z" * 70 + b"\r\n") * 40, "552 5.3.4"),
            (b"Received: a\r\n" * 5 + b"Subject: loop\r\n\r\nx\r\n", "554 5.4.6"),
        ]
        for content, expected in cases:
            await transaction(client)
            await client.send(content + b".\r\n")
            code, text = await client.reply()
            assert f"{code} {text.split()[0]}" == expected
        assert (await client.cmd("MAIL FROM:<a@sender.org> SIZE=4096"))[:1] == (552,)
        # four Received headers are below the limit of five: accepted
        await transaction(client)
        await client.send(b"Received: a\r\n" * 4 + b"Subject: ok\r\n\r\nx\r\n.\r\n")
        assert (await client.reply())[0] == 250
        [content] = stored(front)
        assert content.count(b"Received:") == 5
        await client.close()


# ----------------------------------------------------------------------------- limits


async def test_recipient_limit(tmp_path: Path) -> None:
    async with running_front(make_config(tmp_path, limits={"maxRecipients": 2})) as front:
        client = await session(front)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@sender.org>")
        assert (await client.cmd("RCPT TO:<a@example.com>"))[0] == 250
        assert (await client.cmd("RCPT TO:<b@example.com>"))[0] == 250
        assert await client.cmd("RCPT TO:<c@example.com>") == (452, "4.5.3 Too many recipients")
        await client.close()


async def test_too_many_errors_closes_with_421(tmp_path: Path) -> None:
    async with running_front(make_config(tmp_path, limits={"maxErrors": 3})) as front:
        client = await session(front)
        assert (await client.cmd("BOGUS"))[0] == 500
        assert (await client.cmd("BOGUS"))[0] == 500
        await client.send(b"BOGUS\r\n")
        assert (await client.reply())[0] == 500
        assert (await client.reply())[:1] == (421,)
        assert await client.closed()


async def test_idle_timeout_closes_with_421(tmp_path: Path) -> None:
    async with running_front(make_config(tmp_path, limits={"idleTimeout": "1s"})) as front:
        client = await session(front)
        code, text = await client.reply(timeout=30)
        assert (code, text.split()[0]) == (421, "4.4.2")
        assert await client.closed()


async def test_connection_limits(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"maxConnections": 3, "maxConnectionsPerClient": 2})
    async with running_front(config) as front:
        first = await session(front)
        second = await session(front)
        host, port = front.addresses["smtp"]
        third = await RawClient.connect(host, port)
        code, text = await third.reply()
        assert (code, text) == (421, "4.7.0 Too many connections from your address")
        assert await third.closed()
        await first.close()
        await second.close()


# ----------------------------------------------------------------------------- durability


async def test_250_only_after_the_spool_stored_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_front(make_config(tmp_path)) as front:
        entered = asyncio.Event()
        release = asyncio.Event()
        real_store = front.spool.store

        async def slow_store(entry: Any, content: bytes) -> None:
            entered.set()
            await release.wait()
            await real_store(entry, content)

        monkeypatch.setattr(front.spool, "store", slow_store)
        client = await session(front)
        await transaction(client)
        await client.send(MESSAGE + b".\r\n")
        reply = asyncio.ensure_future(client.reply())
        await entered.wait()
        done, _ = await asyncio.wait({reply}, timeout=0.3)
        assert not done, "the client got a reply before the spool stored the message"
        assert front.spool.ids("incoming") == []
        release.set()
        code, text = await reply
        assert code == 250
        queue_id = text.rsplit(" ", 1)[1]
        assert front.spool.ids("incoming") == [queue_id]  # on disk when the client heard 250
        await client.close()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (SpoolFullError("full"), (452, "4.3.1")),
        (SpoolReadOnlyError("ro"), (451, "4.3.0")),
        (RuntimeError("boom"), (451, "4.3.0")),
    ],
)
async def test_spool_failures_are_never_250(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, expected: tuple[int, str]
) -> None:
    async with running_front(make_config(tmp_path)) as front:

        async def failing_store(entry: Any, content: bytes) -> None:
            raise error

        monkeypatch.setattr(front.spool, "store", failing_store)
        client = await session(front)
        await transaction(client)
        await client.send(MESSAGE + b".\r\n")
        code, text = await client.reply()
        assert (code, text.split()[0]) == expected
        assert await client.cmd("NOOP") == (250, "2.0.0 OK")  # the session goes on
        await client.close()


async def test_on_stored_is_called_with_the_queue_id(tmp_path: Path) -> None:
    seen: list[str] = []
    async with running_front(make_config(tmp_path), on_stored=seen.append) as front:
        client = await session(front)
        await transaction(client)
        await client.send(MESSAGE + b".\r\n")
        code, text = await client.reply()
        assert code == 250 and seen == [text.rsplit(" ", 1)[1]]
        await client.close()


# ----------------------------------------------------------------------------- TLS and AUTH


async def test_starttls_then_auth_on_submission(tmp_path: Path) -> None:
    config, context = tls_config(tmp_path)
    async with running_front(config) as front:
        client = await session(front, "submission")
        _code, text = await client.cmd("EHLO client.test")
        assert "STARTTLS" in text.splitlines() and "AUTH" not in text
        assert (await client.cmd("AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ="))[:1] == (538,)
        assert await client.cmd("MAIL FROM:<alice@sender.org>") == (530, "5.7.0 Authentication required")
        await client.close()

        host, port = front.addresses["submission"]
        smtp = aiosmtplib.SMTP(hostname=host, port=port, tls_context=context, start_tls=True)
        await smtp.connect()
        await smtp.ehlo()
        assert "auth" in smtp.esmtp_extensions and "starttls" not in smtp.esmtp_extensions
        assert {m.upper() for m in smtp.server_auth_methods} == {"PLAIN", "LOGIN"}
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await smtp.login("alice", "wrong")
        assert info.value.code == 535
        await smtp.login("alice", "wonderland")
        errors, _ = await smtp.sendmail(
            "alice@sender.org", ["friend@elsewhere.org"], b"Subject: hi\r\n\r\nx\r\n"
        )
        assert errors == {}
        await smtp.quit()
        [content] = stored(front)
        headers = content.split(b"\r\n\r\n", 1)[0]
        assert b"with ESMTPSA id" in headers and b"(using TLSv1." in headers
        assert b"\r\nDate: " in headers and b"\r\nMessage-ID: <" in headers


async def test_auth_login_and_implicit_tls(tmp_path: Path) -> None:
    config, context = tls_config(tmp_path)
    async with running_front(config) as front:
        host, port = front.addresses["smtps"]
        smtp = aiosmtplib.SMTP(hostname=host, port=port, tls_context=context, use_tls=True)
        await smtp.connect()
        await smtp.ehlo()
        assert "auth" in smtp.esmtp_extensions and "starttls" not in smtp.esmtp_extensions
        response = await smtp.auth_login("alice", "wonderland")
        assert response.code == 235
        message = b"Subject: hi\r\nDate: Wed, 01 May 2024 12:00:00 +0000\r\nMessage-ID: <m@x>\r\n\r\nx\r\n"
        await smtp.sendmail("alice@sender.org", ["friend@elsewhere.org"], message)
        await smtp.quit()
        [content] = stored(front)
        assert content.count(b"Message-ID:") == 1 and content.count(b"Date:") == 1
        assert content.endswith(message)


async def test_relay_listener_offers_auth_only_after_starttls(tmp_path: Path) -> None:
    config, context = tls_config(tmp_path)
    async with running_front(config) as front:
        host, port = front.addresses["smtp"]
        smtp = aiosmtplib.SMTP(hostname=host, port=port, tls_context=context, start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        assert "starttls" in smtp.esmtp_extensions and "auth" not in smtp.esmtp_extensions
        await smtp.starttls()
        await smtp.ehlo()
        assert "starttls" not in smtp.esmtp_extensions
        # this listener has auth none: no AUTH even over TLS, and mail still needs an accept domain
        assert "auth" not in smtp.esmtp_extensions
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await smtp.sendmail("a@sender.org", ["x@evil.com"], b"Subject: x\r\n\r\nx\r\n")
        await smtp.quit()


async def test_auth_brute_force_is_cut_off(tmp_path: Path) -> None:
    config, context = tls_config(tmp_path)
    async with running_front(config) as front:
        host, port = front.addresses["smtps"]
        reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname="localhost")
        client = RawClient(reader, writer)
        assert (await client.reply())[0] == 220
        await client.cmd("EHLO client.test")
        bad = "AUTH PLAIN AGFsaWNlAGd1ZXNz"  # alice / guess
        assert (await client.cmd(bad))[0] == 535
        assert (await client.cmd(bad))[0] == 535
        code, text = await client.cmd(bad)
        assert (code, text.split()[0]) == (421, "4.7.0")
        assert await client.closed()
        # a fresh session may still authenticate with the right password
        smtp = aiosmtplib.SMTP(hostname=host, port=port, tls_context=context, use_tls=True)
        await smtp.connect()
        assert (await smtp.login("alice", "wonderland")).code == 235
        await smtp.quit()


# ----------------------------------------------------------------------------- shutdown


async def test_drain_finishes_transactions_and_refuses_new_sessions(tmp_path: Path) -> None:
    async with running_front(make_config(tmp_path)) as front:
        busy = await session(front)
        await transaction(busy)
        idle = await session(front)
        await idle.cmd("EHLO client.test")
        drain = asyncio.ensure_future(front.drain(grace=30))
        code, text = await idle.reply()
        assert (code, text.split()[0]) == (421, "4.3.2")
        host, port = front.addresses["smtp"]
        late = await RawClient.connect(host, port)
        code, text = await late.reply()
        assert (code, text.split()[0]) == (421, "4.3.2")
        await busy.send(MESSAGE + b".\r\n")
        assert (await busy.reply())[0] == 250
        assert (await busy.reply())[0] == 421  # then the session is closed
        await drain
        assert len(stored(front)) == 1


async def test_renewed_certificate_is_used_without_restart(tmp_path: Path) -> None:
    config, old_context = tls_config(tmp_path)
    async with running_front(config) as front:
        (tmp_path / "renewed").mkdir()
        renewed = make_certs(tmp_path / "renewed")
        assert front.tls is not None and config.tls is not None
        shutil.copyfile(renewed.cert_file, config.tls.cert_file)
        shutil.copyfile(renewed.key_file, config.tls.key_file)
        for path in (config.tls.cert_file, config.tls.key_file):
            os.utime(path, (time.time() + 10, time.time() + 10))
        front.tls._checked = 0.0  # skip the once-a-second throttle
        new_context = ssl.create_default_context(cafile=str(renewed.ca_file))
        for name, options in (("submission", {"start_tls": True}), ("smtps", {"use_tls": True})):
            host, port = front.addresses[name]
            smtp = aiosmtplib.SMTP(hostname=host, port=port, tls_context=new_context, **options)
            await smtp.connect()
            await smtp.quit()
            stale = aiosmtplib.SMTP(hostname=host, port=port, tls_context=old_context, **options)
            with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError)):
                await stale.connect()


def test_starttls_and_auth_under_uvloop(tmp_path: Path) -> None:
    """The relay process runs on uvloop: aiosmtpd's STARTTLS transport swap must work there."""
    config, context = tls_config(tmp_path)

    async def scenario() -> list[str]:
        async with running_front(config) as front:
            replies = []
            for name, options in (("submission", {"start_tls": True}), ("smtps", {"use_tls": True})):
                host, port = front.addresses[name]
                smtp = aiosmtplib.SMTP(hostname=host, port=port, tls_context=context, **options)
                await smtp.connect()
                await smtp.login("alice", "wonderland")
                _errors, text = await smtp.sendmail("alice@x.org", ["b@elsewhere.org"], MESSAGE)
                await smtp.quit()
                replies.append(text.split()[0])
            return replies

    assert uvloop.run(scenario()) == ["2.0.0", "2.0.0"]


async def test_smuggling_never_reaches_the_next_hop_as_a_second_message(tmp_path: Path) -> None:
    """End to end through the scheduler to a real next hop: every smuggling variant arrives as
    exactly one message per transaction, and the smuggled sender never appears."""
    sink = await SmtpSink().start()
    config = make_config(
        tmp_path,
        routes=[
            {
                "name": "next",
                "nextHop": {"kind": "relay", "name": "sink", "host": "127.0.0.1", "port": sink.port},
            }
        ],
    )
    spool = Spool(config.queue.directory)
    spool.prepare()
    scheduler = Scheduler(config, spool)
    await scheduler.start()
    variants = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"]
    try:
        async with running_front(config, spool, on_stored=scheduler.notify) as front:
            client = await session(front)
            for smuggled in variants:
                await transaction(client)
                await client.send(
                    b"Subject: one\r\n\r\nfirst"
                    + smuggled
                    + b"MAIL FROM:<evil@sender.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                    + b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n"
                )
                assert (await client.reply())[0] == 250
            await client.close()
            await scheduler.wait_idle()
        assert len(sink.messages) == len(variants)
        for received in sink.messages:
            assert received.mail_from == "a@sender.org" and received.rcpt_tos == ["u@example.com"]
            assert b"Subject: smuggled" in received.content  # content, not a message
            assert received.content.count(b"\r") == received.content.count(b"\n")
    finally:
        await scheduler.stop(5)
        spool.close()
        await sink.stop()


async def test_the_front_stores_first_and_answers_250_only_after_the_gate(tmp_path: Path) -> None:
    config = make_config(tmp_path, trustedNetworks=["127.0.0.0/8"])
    gate = asyncio.Event()
    gate_reached = asyncio.Event()

    async def intake_gate() -> None:
        gate_reached.set()
        await gate.wait()

    spool = Spool(tmp_path / "queue", fsync=False)
    spool.prepare()
    async with running_front(config, spool, intake_gate=intake_gate) as front:
        host, port = front.addresses["smtp"]

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP(host, port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("s@sender.test")
                client.rcpt("a@example.com")
                return client.data(b"Subject: held\r\n\r\nbody\r\n")

        sending = asyncio.create_task(asyncio.to_thread(send))
        await asyncio.wait_for(gate_reached.wait(), 30)
        assert len(spool.ids("incoming")) == 1  # durable before the gate
        assert not sending.done()  # and no reply yet
        gate.set()
        code, text = await asyncio.wait_for(sending, 30)
        assert code == 250 and b"queued as" in text
    spool.close()
