"""Every way an SMTP session ends gives its session slot back (issue 12, part 2).

A session holds a slot in the front from the moment its TCP connection is accepted: it counts
towards ``limits.maxConnections`` and ``limits.maxConnectionsPerClient`` and the
``mailrelay_smtp_sessions`` gauge. A STARTTLS or implicit-TLS session whose handshake never
completed used to keep its slot forever (asyncio's SSL protocol does not tell the application
protocol that a connection it never announced was lost), so 50 abandoned STARTTLS sessions from
one address locked that address out and a drain waited for sessions that did not exist.

Each exit path below runs on real loopback sockets against a running front (in-process, on
asyncio and on uvloop) and checks, afterwards, that the per-address and global counters and the
gauge are back where they were and that a full STARTTLS (or implicit TLS) + AUTH session still
succeeds. The last test does the same against a running `mailrelay relay` process.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
import uvloop
from prometheus_client import REGISTRY

from relay.front import Front
from tests.faults.harness import Relay, relay_config, running_sink
from tests.relay.apphelp import free_port, http_get, until
from tests.relay.fronthelp import RawClient, make_certs, running_front, tls_config, write_users

MESSAGE = b"Subject: slots\r\nFrom: alice@sender.org\r\n\r\nbody\r\n"
GARBAGE = b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n"  # not a TLS ClientHello

Slots = tuple[int, int, dict[str, int], dict[str, float]]


def slots(front: Front) -> Slots:
    """The session bookkeeping: registered sessions, the global and per-address counters and
    the gauge of every listener."""
    gauge = {
        name: REGISTRY.get_sample_value("mailrelay_smtp_sessions", {"listener": name}) or 0.0
        for name in front.listeners
    }
    return len(front.sessions), front.stats.sessions, dict(front.stats.per_client), gauge


async def settled(front: Front, before: Slots) -> None:
    """Wait (the server closes asynchronously) until the bookkeeping is back to `before`."""
    with_message = None
    try:
        await until(lambda: slots(front) == before, timeout=15)
    except AssertionError:
        with_message = slots(front)
    assert with_message is None, f"session slots not released: {with_message} != {before}"


async def full_session(front: Front, listener: str, context: ssl.SSLContext) -> str:
    """STARTTLS (or implicit TLS) + AUTH PLAIN + one message; the text of the 250."""
    host, port = front.addresses[listener]
    implicit = listener == "smtps"
    smtp = aiosmtplib.SMTP(
        hostname=host, port=port, tls_context=context, use_tls=implicit, start_tls=not implicit, timeout=30
    )
    await smtp.connect()
    await smtp.login("alice", "wonderland")
    _errors, text = await smtp.sendmail("alice@sender.org", ["friend@elsewhere.org"], MESSAGE)
    await smtp.quit()
    return text


async def greeted(front: Front, listener: str) -> RawClient:
    host, port = front.addresses[listener]
    client = await RawClient.connect(host, port)
    code, text = await client.reply()
    assert code == 220, (code, text)
    return client


async def after_starttls_220(front: Front, listener: str = "submission") -> RawClient:
    """A session that sent EHLO and STARTTLS and read the 220: the server now waits for a
    ClientHello."""
    client = await greeted(front, listener)
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("STARTTLS"))[0] == 220
    return client


async def tls_upgraded(front: Front, context: ssl.SSLContext, listener: str = "submission") -> RawClient:
    client = await after_starttls_220(front, listener)
    await client.writer.start_tls(context, server_hostname="localhost")
    assert (await client.cmd("EHLO client.test"))[0] == 250
    return client


async def implicit_tls(front: Front, context: ssl.SSLContext) -> RawClient:
    host, port = front.addresses["smtps"]
    client = await RawClient.connect(host, port, ssl=context, server_hostname="localhost")
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    return client


async def raw_tcp(front: Front, listener: str) -> RawClient:
    host, port = front.addresses[listener]
    return await RawClient.connect(host, port)


def reset(client: RawClient) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed client or a middlebox does."""
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()


async def start_data(client: RawClient) -> None:
    assert (await client.cmd("AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ="))[0] == 235
    assert (await client.cmd("MAIL FROM:<alice@sender.org>"))[0] == 250
    assert (await client.cmd("RCPT TO:<friend@elsewhere.org>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(b"Subject: half\r\n\r\nthe first half of a message")


def untrusting_context() -> ssl.SSLContext:
    """A client that does not trust the relay's certificate (another CA): it aborts the
    handshake with an alert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trustme.CA().configure_trust(context)
    return context


# ----------------------------------------------------------------------------- the exit paths
# Each scenario gets the started front and the trusting client context and leaves the session
# ended (by the client or by the server); the test then checks the slots. Most take first how
# the session is opened: pending (STARTTLS answered 220, or TCP to the implicit-TLS port, and
# no ClientHello yet) or over TLS.

Opener = Callable[[Front, ssl.SSLContext], Awaitable[RawClient]]


async def starttls_pending(front: Front, context: ssl.SSLContext) -> RawClient:
    return await after_starttls_220(front)


async def implicit_pending(front: Front, context: ssl.SSLContext) -> RawClient:
    return await raw_tcp(front, "smtps")


async def abandoned(open_session: Opener, front: Front, context: ssl.SSLContext) -> None:
    client = await open_session(front, context)
    await client.close()


async def garbage(open_session: Opener, front: Front, context: ssl.SSLContext) -> None:
    client = await open_session(front, context)
    await client.send(GARBAGE)
    assert await client.closed()


async def handshake_timeout(open_session: Opener, front: Front, context: ssl.SSLContext) -> None:
    front.tls_handshake_timeout = 0.5
    client = await open_session(front, context)
    assert await client.closed(timeout=30)  # the server gave up on the handshake


async def reset_during_data(open_session: Opener, front: Front, context: ssl.SSLContext) -> None:
    client = await open_session(front, context)
    await start_data(client)
    reset(client)


async def quit_over_tls(open_session: Opener, front: Front, context: ssl.SSLContext) -> None:
    client = await open_session(front, context)
    assert (await client.cmd("QUIT"))[0] == 221
    assert await client.closed()
    await client.close()


async def starttls_certificate_refused(front: Front, context: ssl.SSLContext) -> None:
    client = await after_starttls_220(front)
    with pytest.raises(ssl.SSLError):
        await client.writer.start_tls(untrusting_context(), server_hostname="localhost")
    await client.close()


async def implicit_certificate_refused(front: Front, context: ssl.SSLContext) -> None:
    host, port = front.addresses["smtps"]
    with pytest.raises(ssl.SSLError):
        await RawClient.connect(host, port, ssl=untrusting_context(), server_hostname="localhost")


async def idle_timeout_during_handshake(front: Front, context: ssl.SSLContext) -> None:
    client = await after_starttls_220(front)  # idleTimeout is 1 s in this case
    assert await client.closed(timeout=30)


async def plain_reset_during_data(front: Front, context: ssl.SSLContext) -> None:
    client = await greeted(front, "smtp")
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@sender.org>"))[0] == 250
    assert (await client.cmd("RCPT TO:<u@example.com>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(b"Subject: half\r\n\r\nthe first half")
    reset(client)


async def tls_idle_timeout(front: Front, context: ssl.SSLContext) -> None:
    client = await tls_upgraded(front, context)  # idleTimeout is 1 s in this case
    code, text = await client.reply(timeout=30)
    assert (code, text.split()[0]) == (421, "4.4.2")
    assert await client.closed()


async def tls_too_many_errors(front: Front, context: ssl.SSLContext) -> None:
    client = await tls_upgraded(front, context)  # maxErrors is 2 in this case
    await client.send(b"BOGUS\r\nBOGUS\r\n")
    assert [(await client.reply())[0] for _ in range(3)] == [500, 500, 421]
    assert await client.closed()
    await client.close()


Scenario = Callable[[Front, ssl.SSLContext], Awaitable[None]]
CASES: dict[str, tuple[Scenario, dict[str, Any]]] = {
    "starttls-abandoned-after-220": (partial(abandoned, starttls_pending), {}),
    "starttls-garbage-instead-of-client-hello": (partial(garbage, starttls_pending), {}),
    "starttls-client-refuses-certificate": (starttls_certificate_refused, {}),
    "starttls-handshake-timeout": (partial(handshake_timeout, starttls_pending), {}),
    "starttls-idle-timeout-during-handshake": (idle_timeout_during_handshake, {"idleTimeout": "1s"}),
    "starttls-reset-during-data": (partial(reset_during_data, tls_upgraded), {}),
    "plain-reset-during-data": (plain_reset_during_data, {}),
    "tls-idle-timeout": (tls_idle_timeout, {"idleTimeout": "1s"}),
    "tls-server-closes-after-quit": (partial(quit_over_tls, tls_upgraded), {}),
    "tls-server-closes-after-too-many-errors": (tls_too_many_errors, {"maxErrors": 2}),
    "implicit-tcp-closed-before-client-hello": (partial(abandoned, implicit_pending), {}),
    "implicit-garbage-instead-of-client-hello": (partial(garbage, implicit_pending), {}),
    "implicit-client-refuses-certificate": (implicit_certificate_refused, {}),
    "implicit-handshake-timeout": (partial(handshake_timeout, implicit_pending), {}),
    "implicit-reset-during-data": (partial(reset_during_data, implicit_tls), {}),
    "implicit-server-closes-after-quit": (partial(quit_over_tls, implicit_tls), {}),
}


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    """The relay process runs on uvloop, tests usually on asyncio: both must release."""
    if loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_exit_path_releases_the_session_slot(tmp_path: Path, case: str, loop: str) -> None:
    scenario, limits = CASES[case]
    config, context = tls_config(tmp_path, limits=limits)

    async def main() -> None:
        async with running_front(config) as front:
            before = slots(front)
            assert before[:3] == (0, 0, {})
            for _ in range(3):  # the same path again finds the counters where they were
                await scenario(front, context)
                await settled(front, before)
            front.tls_handshake_timeout = 30.0
            for listener in ("submission", "smtps"):
                assert (await full_session(front, listener, context)).startswith("2.0.0")
            await settled(front, before)

    run_on(loop, main())


async def test_120_abandoned_starttls_sessions_then_a_full_session(tmp_path: Path) -> None:
    """The issue's reproduction: more abandoned STARTTLS sessions from one address than
    ``maxConnectionsPerClient`` (50), then a session that must get in."""
    config, context = tls_config(tmp_path)
    async with running_front(config) as front:
        before = slots(front)
        for _ in range(120):
            await abandoned(starttls_pending, front, context)  # each greeted with 220, not 421
        await settled(front, before)
        assert (await full_session(front, "submission", context)).startswith("2.0.0")
        await settled(front, before)


async def test_pending_handshakes_hold_slots_while_they_last(tmp_path: Path) -> None:
    """An implicit-TLS connection counts from its TCP accept, not from its completed handshake:
    connections that never send a ClientHello cannot get round ``maxConnectionsPerClient``."""
    config, context = tls_config(tmp_path, limits={"maxConnectionsPerClient": 2})
    async with running_front(config) as front:
        before = slots(front)
        pending = [await raw_tcp(front, "smtps"), await raw_tcp(front, "smtps")]
        await until(lambda: front.stats.per_client.get("127.0.0.1") == 2, timeout=15)
        host, port = front.addresses["smtps"]
        third = await RawClient.connect(host, port, ssl=context, server_hostname="localhost")
        code, text = await third.reply()
        assert (code, text) == (421, "4.7.0 Too many connections from your address")
        assert await third.closed()
        await third.close()
        for client in pending:
            await client.close()
        await settled(front, before)
        assert (await full_session(front, "smtps", context)).startswith("2.0.0")


async def test_drain_releases_sessions_stuck_in_a_handshake(tmp_path: Path) -> None:
    """SIGTERM's drain closes every session, also those between STARTTLS and a ClientHello
    that never comes, and those that connected to an implicit-TLS port and sent nothing; the
    front ends with no session registered (it used to wait its whole grace for them)."""
    config, context = tls_config(tmp_path)
    async with running_front(config) as front:
        stuck_starttls = await after_starttls_220(front)
        stuck_implicit = await raw_tcp(front, "smtps")
        idle_tls = await tls_upgraded(front, context)
        idle_plain = await greeted(front, "smtp")
        await until(lambda: front.stats.sessions == 4, timeout=15)
        await front.drain(grace=1)
        for client in (stuck_starttls, stuck_implicit, idle_tls, idle_plain):
            assert await client.closed()
            await client.close()
        await until(lambda: not front.sessions, timeout=15)
        assert slots(front) == (0, 0, {}, {"smtp": 0.0, "submission": 0.0, "smtps": 0.0})


# ----------------------------------------------------------------------------- a relay process


def gauge_total(metrics_port: int) -> float:
    _status, body = http_get(metrics_port, "/metrics")
    values = re.findall(r"^mailrelay_smtp_sessions\{[^}]*\} (\S+)$", body, re.MULTILINE)
    return sum(float(value) for value in values)


async def test_120_abandoned_starttls_sessions_against_a_relay_process(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    users = write_users(tmp_path, {"alice": "wonderland"})
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    submission_port = free_port()
    with running_sink() as sink:
        config = relay_config(
            tmp_path,
            smtp_port=free_port(),
            next_hop_port=sink.port,
            submission_port=submission_port,
            tls=certs.tls,
            auth={"usersFile": str(users)},
            workers=1,  # one process: its per-address limit (50) is the whole limit
        )
        metrics_port = int(config["metrics"]["port"])
        relay = await Relay(tmp_path, config).astart()
        try:
            for number in range(120):
                reader, writer = await asyncio.open_connection("127.0.0.1", submission_port)
                client = RawClient(reader, writer)
                code, text = await client.reply()
                assert code == 220, f"abandoned session {number + 1}: {code} {text}"
                assert (await client.cmd("EHLO client.test"))[0] == 250
                assert (await client.cmd("STARTTLS"))[0] == 220
                await client.close()

            async def no_sessions() -> bool:
                return await asyncio.to_thread(gauge_total, metrics_port) == 0.0

            await until(no_sessions)
            # the address has its whole allowance back: 50 sessions at once are all greeted
            held = []
            for _ in range(50):
                reader, writer = await asyncio.open_connection("127.0.0.1", submission_port)
                held.append(RawClient(reader, writer))
            assert [(await client.reply())[0] for client in held] == [220] * 50
            for client in held:
                await client.close()
            await until(no_sessions)
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=submission_port, tls_context=context, start_tls=True, timeout=30
            )
            await smtp.connect()
            await smtp.login("alice", "wonderland")
            _errors, text = await smtp.sendmail(
                "alice@sender.org", ["user@example.com"], b"Subject: after\r\n\r\nx\r\n"
            )
            await smtp.quit()
            assert text.startswith("2.0.0")
            await asyncio.to_thread(sink.wait_count, 1)
            relay.run.signal(signal.SIGTERM)
            assert await asyncio.to_thread(relay.run.wait, 60) == 0
            relay.assert_no_traceback()
        finally:
            relay.stop()
