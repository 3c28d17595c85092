"""Hostile input that is not smuggling or relaying: overlong commands and lines, thousands of
recipients, binary garbage, commands before the banner, CR/LF injection through envelope
addresses and DSN parameters, hundreds of idle connections, slow senders, AUTH before TLS and
AUTH brute force. Each case gets a clear SMTP reply (or a closed connection), the process
never crashes, and a normal client is served afterwards."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import socket
import ssl
import time

from tests.faults.harness import RawSession, message_with_token, record_figures, send_one
from tests.hostile.conftest import TRUSTED, UNTRUSTED, USERS, Hostile

FIGURES: dict[str, int] = {}


def session(hostile: Hostile, source: str = UNTRUSTED, port: int | None = None) -> RawSession:
    s = RawSession.connect(port or hostile.port, source=source)
    assert s.reply()[0] == 220
    return s


def still_serves(hostile: Hostile, token: str) -> None:
    asyncio.run(send_one(hostile.port, token))
    hostile.inbox.wait_tokens({token}, 60)


def test_overlong_command_and_data_lines(hostile: Hostile) -> None:
    with session(hostile) as s:
        assert s.cmd(b"EHLO " + b"a" * 100_000)[0] == 500  # 5.5.2 Line too long
        assert s.cmd("NOOP")[0] == 250  # the session goes on
        assert s.cmd("EHLO client.test")[0] == 250
        assert s.cmd(b"MAIL FROM:<" + b"x" * 3000 + b"@sender.test>")[0] == 500
        assert s.cmd("MAIL FROM:<sender@sender.test>")[0] == 250
        assert s.cmd(b"RCPT TO:<user@" + b"y" * 300 + b".example.com>")[0] == 553  # label > 63
        assert s.cmd("RCPT TO:<user@example.com>")[0] == 250
        assert s.cmd("DATA")[0] == 354
        s.send(message_with_token("long-line", body=b"z" * 5000 + b"\r\n") + b".\r\n")
        code, text = s.reply()
        assert (code, text.split()[1]) == (554, "5.6.0")  # line longer than 998 octets
        assert s.cmd("MAIL FROM:<sender@sender.test>")[0] == 250
        assert s.cmd("RCPT TO:<user@example.com>")[0] == 250
        assert s.cmd("DATA")[0] == 354
        s.send(message_with_token("too-big", body=b"0123456789abcdef\r\n" * 8000) + b".\r\n")
        code, text = s.reply()
        assert (code, text.split()[1]) == (552, "5.3.4")  # over the 64 KiB limit
    still_serves(hostile, "after-long")
    assert "long-line" not in hostile.inbox.tokens() and "too-big" not in hostile.inbox.tokens()


def test_thousands_of_recipients_pipelined(hostile: Hostile) -> None:
    count = 3000
    with session(hostile) as s:
        assert s.cmd("EHLO client.test")[0] == 250
        commands = b"MAIL FROM:<sender@sender.test>\r\n" + b"".join(
            f"RCPT TO:<u{i}@example.com>\r\n".encode() for i in range(count)
        )
        s.send(commands)
        codes = [s.reply()[0] for _ in range(count + 1)]
        assert codes[0] == 250
        assert codes[1:51] == [250] * 50 and set(codes[51:]) == {452}  # 4.5.3 Too many recipients
        assert s.cmd("DATA")[0] == 354
        s.send(message_with_token("many-rcpts") + b".\r\n")
        assert s.reply()[0] == 250
    hostile.inbox.wait_tokens({"many-rcpts"}, 60)
    [message] = [m for m in hostile.inbox.messages if m.token == "many-rcpts"]
    assert sorted(message.rcpt_tos) == sorted(f"u{i}@example.com" for i in range(50))
    FIGURES["recipients_sent"] = count


def test_binary_garbage_gets_errors_and_a_closed_connection(hostile: Hostile) -> None:
    rng = random.Random(8)
    payloads = [bytes(range(256)) * 8, b"\xff\xfe\xfd" * 3000, b"\x00" * 10_000]
    payloads += [rng.randbytes(rng.randint(1, 20_000)) for _ in range(30)]
    for payload in payloads:
        with session(hostile) as s:
            s.send(payload)
            with contextlib.suppress(OSError):
                s.send(b"\r\nQUIT\r\n")
            replies = s.replies_until_closed()
            assert all(400 <= code < 600 or code == 221 for code, _ in replies), replies
    FIGURES["garbage_payloads"] = len(payloads)
    still_serves(hostile, "after-garbage")


def test_commands_before_the_banner_are_answered_in_order_after_it(hostile: Hostile) -> None:
    """An early talker gets its answers only after the greeting, one per command, and the
    relay rules still apply to it (no pregreet bypass)."""
    sock = socket.create_connection(("127.0.0.1", hostile.port), source_address=(UNTRUSTED, 0), timeout=30)
    sock.sendall(b"EHLO early.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<victim@victim.test>\r\nQUIT\r\n")
    s = RawSession(sock)
    replies = s.replies_until_closed()
    s.close()
    assert [code for code, _ in replies] == [220, 250, 250, 554, 221]
    assert replies[3][1].split()[1] == "5.7.1"


def test_crlf_injection_through_envelope_and_dsn_parameters(hostile: Hostile) -> None:
    with session(hostile, source=TRUSTED) as s:
        assert s.cmd("EHLO client.test")[0] == 250
        for line in [
            b"MAIL FROM:<a@sender.test>\rX-Injected: 1",
            b"MAIL FROM:<a\r\nX-Injected: 1@sender.test>",
            b"MAIL FROM:<a@sender.test> ENVID=x\rX-Injected:1",
        ]:
            s.send(line + b"\r\n")
            code, _ = s.reply()
            if b"\r\n" in line:  # CRLF ends the command: an unterminated path, then junk
                assert code == 553
                assert s.reply()[0] == 500
            else:
                assert code == 501  # bare CR inside a command line
        # xtext can carry CR LF (+0D+0A): the DSN fields must not turn it into header lines
        assert s.cmd("MAIL FROM:<sender@sender.test> ENVID=e+0D+0AX-Injected:+1 RET=HDRS")[0] in (250, 501)
        s.cmd("RSET")
        assert s.cmd("MAIL FROM:<sender@sender.test> RET=HDRS")[0] == 250
        code, _ = s.cmd(
            "RCPT TO:<nobody@bounce.example.com> NOTIFY=FAILURE ORCPT=rfc822;x+0D+0AX-Injected:+1"
        )
        assert code in (250, 501)
        if code != 250:
            assert s.cmd("RCPT TO:<nobody@bounce.example.com> NOTIFY=FAILURE")[0] == 250
        assert s.cmd("DATA")[0] == 354
        s.send(message_with_token("injection") + b".\r\n")
        assert s.reply()[0] == 250
    # the next hop refuses it: the relay bounces it with a DSN to sender@sender.test (inbox)
    hostile.inbox.wait(
        lambda sink: any(m.mail_from == "" and b"injection" in m.content for m in sink.messages)
    )
    everything = hostile.inbox.messages + hostile.victim.messages + hostile.bounce.messages
    for message in everything:
        lines = message.content.split(b"\r\n")
        assert not any(line.startswith(b"X-Injected") for line in lines), message.content


def test_hundreds_of_idle_connections_do_not_starve_a_normal_client(hostile: Hostile) -> None:
    idle: list[RawSession] = []
    refused = 0
    try:
        # (the idle timeout is 3 s: check the per-address limit right after its 50 sessions)
        for source_no in range(10, 16):  # six client addresses, 50 sessions each
            for _ in range(50):
                idle.append(session(hostile, source=f"127.0.0.{source_no}"))
            # one more from an address that already has 50 is turned away
            with RawSession.connect(hostile.port, source=f"127.0.0.{source_no}") as extra:
                code, text = extra.reply()
                assert (code, text.split()[1]) == (421, "4.7.0")
                refused += 1
        still_serves(hostile, "despite-idlers")
    finally:
        for s in idle:
            s.close()
    FIGURES["idle_connections"] = len(idle)
    FIGURES["refused_over_per_client_limit"] = refused


def test_slow_senders_hit_the_idle_timeout(hostile: Hostile) -> None:
    with session(hostile) as silent:
        code, text = silent.reply()  # nothing sent: the relay gives up after idleTimeout (3 s)
        assert (code, text.split()[1]) == (421, "4.4.2")
        assert silent.closed()
    with session(hostile) as stalled:
        assert stalled.cmd("EHLO client.test")[0] == 250
        assert stalled.cmd("MAIL FROM:<sender@sender.test>")[0] == 250
        assert stalled.cmd("RCPT TO:<user@example.com>")[0] == 250
        assert stalled.cmd("DATA")[0] == 354
        stalled.send(message_with_token("stalled")[:30])  # and then nothing
        assert stalled.replies_until_closed() in (
            [],
            [(421, "421 4.4.2 Idle timeout exceeded, closing connection")],
        )
    assert "stalled" not in hostile.inbox.tokens()


def _starttls(hostile: Hostile) -> RawSession:
    s = session(hostile, port=hostile.submission_port)
    assert s.cmd("EHLO client.test")[0] == 250
    assert s.cmd("STARTTLS")[0] == 220
    context = ssl.create_default_context(cafile=str(hostile.certs.ca_file))
    s.sock = context.wrap_socket(s.sock, server_hostname="localhost")
    assert s.cmd("EHLO client.test")[0] == 250
    return s


def _plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_commands_injected_behind_starttls_are_discarded(hostile: Hostile) -> None:
    """CVE-2011-0411 (STARTTLS command injection): plaintext sent in the same packet as
    STARTTLS must not be executed inside the TLS session."""
    with session(hostile, port=hostile.submission_port) as s:
        assert s.cmd("EHLO client.test")[0] == 250
        s.send(b"STARTTLS\r\nRSET injected\r\n")
        assert s.reply()[0] == 220
        context = ssl.create_default_context(cafile=str(hostile.certs.ca_file))
        s.sock = context.wrap_socket(s.sock, server_hostname="localhost")
        # had "RSET injected" survived, its 501 would come before the NOOP's 250
        assert s.cmd("NOOP")[0] == 250
        assert s.cmd("EHLO client.test")[0] == 250


def test_auth_before_tls_is_refused(hostile: Hostile) -> None:
    with session(hostile, port=hostile.submission_port) as s:
        code, ehlo = s.cmd("EHLO client.test")
        assert code == 250 and "AUTH" not in ehlo and "STARTTLS" in ehlo
        code, text = s.cmd(_plain("alice", USERS["alice"]))
        assert code == 538 or (code == 530 and text.split()[1].startswith("5.7"))  # never 235
        assert s.cmd("MAIL FROM:<alice@sender.test>")[0] == 530  # and no mail without it


def test_auth_brute_force_is_slowed_then_refused(hostile: Hostile) -> None:
    with _starttls(hostile) as s:
        started = time.monotonic()
        codes = [s.cmd(_plain("alice", f"guess-{i}"))[0] for i in range(2)]
        codes.append(s.cmd(_plain("alice", "guess-2"))[0])
        elapsed = time.monotonic() - started
        assert codes == [535, 535, 421]
        assert s.closed()
    # each failure waits 0.5 s times the failure count before answering: 0.5 + 1.0 + 1.5
    assert elapsed >= 3.0
    with _starttls(hostile) as s:  # the right password on a new session still works
        assert s.cmd(_plain("alice", USERS["alice"]))[0] == 235
    FIGURES["auth_guesses_before_disconnect"] = 3


def test_no_traceback_and_figures(hostile: Hostile) -> None:
    record_figures("hostile.inputs", **FIGURES, **hostile.health())
    hostile.relay.assert_no_traceback()
    assert hostile.health()["crashes"] == 0
    assert hostile.victim.messages == []
