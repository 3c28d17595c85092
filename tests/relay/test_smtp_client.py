"""relay.smtp_client (and relay.delivery on top of it) against scripted raw asyncio SMTP servers
on loopback: what goes on the wire, in which writes, and what happens to every reply.

`RawServer` answers like a small MTA and can be told to: advertise PIPELINING or not; hold the
replies to MAIL and RCPT until DATA has arrived (a client that does not pipeline waits for a
reply that never comes); refuse a command that arrives while its previous reply is still
pending (a client that pipelines without PIPELINING is cut off); answer with given replies,
raw bytes included (malformed, oversize); send its replies one byte per write."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import pytest
import uvloop

from relay import smtp_client
from relay.config import QueueConfig
from relay.core.model import DeliveryRequest, Envelope, Message, QueueEntry, Recipient, RecipientOutcome
from relay.delivery import SmtpClient, SmtpTarget
from relay.smtp_client import (
    ReplyParser,
    ServerReply,
    SmtpConnection,
    SmtpConnectionLost,
    SmtpError,
    SmtpProtocolError,
    SmtpReplyError,
    SmtpTimeout,
    TransactionReplies,
    UnsafeCommand,
    command_line,
    parse_extensions,
)

CONTENT = b"Subject: hi\r\n\r\nhello\r\n.dot line\r\n"
QUEUE = QueueConfig(connect_timeout=2, command_timeout=2, data_timeout=2)

Answer = Callable[["RawSession", str], "bytes | str | None"]


@dataclass
class RawServer:
    """A scripted SMTP server. `answer(session, line)` may override the reply to any command
    (return None for the default)."""

    pipelining: bool = True
    hold_until_data: bool = False
    strict_lockstep: bool = False
    drip: bool = False
    extensions: list[str] = field(default_factory=lambda: ["SIZE 1000000", "8BITMIME"])
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    answer: Answer | None = None
    pause_reading_after_354: bool = False
    greeting: bytes = b"220 raw.test ESMTP\r\n"
    # what it saw
    commands: list[str] = field(default_factory=list)
    chunks_with_commands: list[list[str]] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    sessions: list[RawSession] = field(default_factory=list)
    port: int = 0
    _server: asyncio.base_events.Server | None = None

    async def start(self) -> RawServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: RawSession(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for session in self.sessions:
            if session.transport is not None:
                session.transport.abort()
        await self._server.wait_closed()


class RawSession(asyncio.Protocol):
    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.accepted = 0
        self.held: list[bytes] = []
        self.pending = False  # strict_lockstep: a reply is scheduled but not yet sent
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.auth_step = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.sessions.append(self)
        if self.server.drip:
            asyncio.get_running_loop().create_task(self._drip())
        self.send(self.server.greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    async def _drip(self) -> None:
        while True:
            data = await self.outbox.get()
            for i in range(len(data)):
                if self.transport is None:
                    return
                self.transport.write(data[i : i + 1])
                await asyncio.sleep(0)  # let each byte leave as its own segment

    def send(self, reply: bytes) -> None:
        if self.transport is None:
            return
        if self.server.drip:
            self.outbox.put_nowait(reply)
        elif self.server.strict_lockstep:
            self.pending = True
            asyncio.get_running_loop().call_later(0.02, self._flush, reply)
        else:
            self.transport.write(reply)

    def _flush(self, reply: bytes) -> None:
        self.pending = False
        if self.transport is not None:
            self.transport.write(reply)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        lines: list[str] = []
        while self.transport is not None:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    end, skip = 0, 3
                else:
                    index = self.buffer.find(b"\r\n.\r\n")
                    if index < 0:
                        break
                    end, skip = index + 2, index + 5
                content = bytes(self.buffer[:end]).replace(b"\r\n..", b"\r\n.")
                if content.startswith(b".."):
                    content = content[1:]
                del self.buffer[:skip]
                self.in_data = False
                self.server.messages.append(content)
                self.reply("<final>", "250 2.0.0 queued")
                continue
            index = self.buffer.find(b"\r\n")
            if index < 0:
                break
            line = bytes(self.buffer[:index]).decode("utf-8", "surrogateescape")
            del self.buffer[: index + 2]
            lines.append(line)
            self.command(line)
        if lines:
            self.server.chunks_with_commands.append(lines)

    def reply(self, line: str, default: str) -> None:
        custom = self.server.answer(self, line) if self.server.answer else None
        reply = default if custom is None else custom
        data = reply if isinstance(reply, bytes) else reply.encode() + b"\r\n"
        if line == "<final>" or not self.server.hold_until_data:
            self.send(data)
            return
        self.held.append(data)
        if line.upper() == "DATA" or not line.upper().startswith(("MAIL", "RCPT")):
            self.send(b"".join(self.held))
            self.held = []

    def command(self, line: str) -> None:
        server = self.server
        server.commands.append(line)
        if server.strict_lockstep and self.pending:
            server.violations.append(line)
            assert self.transport is not None
            self.transport.write(b"554 5.5.0 command sent before the previous reply\r\n")
            self.transport.close()
            self.transport = None
            return
        if self.auth_step:
            self.auth_step = "" if self.auth_step == "password" else "password"
            self.reply(line, "235 2.7.0 ok" if not self.auth_step else "334 UGFzc3dvcmQ6")
            return
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            keywords = [*server.extensions, *(["PIPELINING"] if server.pipelining else [])]
            lines = ["raw.test hello", *keywords]
            text = "".join(f"250-{k}\r\n" for k in lines[:-1]) + f"250 {lines[-1]}\r\n"
            self.reply(line, text.removesuffix("\r\n"))
        elif verb == "HELO":
            self.reply(line, "250 raw.test")
        elif verb == "MAIL":
            self.accepted = 0
            self.reply(line, "250 2.1.0 ok")
        elif verb == "RCPT":
            address = line.split(":", 1)[1].split(">", 1)[0].strip(" <")
            reply = server.rcpt_replies.get(address, "250 2.1.5 ok")
            if reply.startswith("2"):
                self.accepted += 1
            self.reply(line, reply)
        elif verb == "DATA":
            if self.accepted:
                self.in_data = True
                self.reply(line, "354 go ahead")
            else:
                self.reply(line, "554 5.5.1 no valid recipients")
            if self.in_data and server.pause_reading_after_354 and self.transport is not None:
                self.transport.pause_reading()
        elif verb == "AUTH":
            if line.upper() == "AUTH LOGIN":
                self.auth_step = "user"
                self.reply(line, "334 VXNlcm5hbWU6")
            else:
                self.reply(line, "235 2.7.0 ok")
        elif verb in ("RSET", "NOOP"):
            self.reply(line, "250 2.0.0 ok")
        elif verb == "QUIT":
            self.reply(line, "221 2.0.0 bye")
            assert self.transport is not None
            self.transport.close()
        else:
            self.reply(line, "500 5.5.2 unknown command")


@pytest.fixture
async def servers() -> AsyncIterator[list[RawServer]]:
    started: list[RawServer] = []
    yield started
    for server in started:
        await server.stop()


async def serve(servers: list[RawServer], **kwargs: object) -> RawServer:
    server = await RawServer(**kwargs).start()  # type: ignore[arg-type]
    servers.append(server)
    return server


@pytest.fixture
async def client() -> AsyncIterator[SmtpClient]:
    c = SmtpClient("relay.test", QUEUE)
    yield c
    await c.close()


def request(recipients: Sequence[str], content: bytes = CONTENT) -> DeliveryRequest:
    rcpts = tuple(Recipient(r) for r in recipients)
    entry = QueueEntry("Q1", Envelope(mail_from="s@sender.test", recipients=rcpts), 0.0, rcpts)
    return DeliveryRequest(Message(entry, content), rcpts)


def dispositions(outcomes: Sequence[RecipientOutcome]) -> list[tuple[str, str, int]]:
    return [(o.disposition.value, o.status, o.code) for o in outcomes]


async def connect(server: RawServer) -> SmtpConnection:
    connection = await SmtpConnection.open("127.0.0.1", server.port, timeout=2)
    await connection.hello("relay.test", 2)
    return connection


def lines(*commands: str) -> list[bytes]:
    return [c.encode() + b"\r\n" for c in commands]


# --------------------------------------------------------------------------- pipelining


async def test_pipelined_group_goes_out_in_one_write_before_any_reply(servers: list[RawServer]) -> None:
    """The server answers MAIL only once RCPT and DATA have arrived too: a client that waited
    for MAIL's reply first would run into its timeout."""
    server = await serve(servers, hold_until_data=True)
    connection = await connect(server)
    replies = await connection.send_mail(
        *lines("MAIL FROM:<s@sender.test>"),
        lines("RCPT TO:<a@d.test>", "RCPT TO:<b@d.test>"),
        b"hello\r\n.\r\n",
        TransactionReplies(),
        command_timeout=2,
        data_timeout=2,
    )
    assert replies.mail == ServerReply(250, "2.1.0 ok")
    assert [r.code for r in replies.recipients] == [250, 250]
    assert replies.data is not None and replies.data.code == 354
    assert replies.final == ServerReply(250, "2.0.0 queued")
    assert server.messages == [b"hello\r\n"]
    group = ["MAIL FROM:<s@sender.test>", "RCPT TO:<a@d.test>", "RCPT TO:<b@d.test>", "DATA"]
    assert group in server.chunks_with_commands  # one segment: one write
    connection.close()


async def test_delivery_pipelines_through_the_pool(client: SmtpClient, servers: list[RawServer]) -> None:
    server = await serve(servers, hold_until_data=True)
    target = SmtpTarget("127.0.0.1", server.port)
    for i in range(3):
        outcomes = await client.deliver(target, request([f"a{i}@d.test", f"b{i}@d.test"]))
        assert dispositions(outcomes) == [("delivered", "2.0.0", 250)] * 2
    assert server.messages == [CONTENT] * 3
    assert len(server.sessions) == 1


async def test_without_pipelining_each_command_waits_for_its_reply(
    client: SmtpClient, servers: list[RawServer]
) -> None:
    """The server cuts the session off when a command arrives before its previous reply."""
    server = await serve(servers, pipelining=False, strict_lockstep=True)
    target = SmtpTarget("127.0.0.1", server.port)
    outcomes = await client.deliver(target, request(["a@d.test", "b@d.test", "c@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0", 250)] * 3
    assert server.violations == []
    assert server.messages == [CONTENT]
    assert all(len(chunk) == 1 for chunk in server.chunks_with_commands)


async def test_strict_server_does_catch_a_pipelining_client(servers: list[RawServer]) -> None:
    """The strict server of the test above really notices a pipelined group."""
    server = await serve(servers, pipelining=False, strict_lockstep=True)
    connection = await connect(server)
    connection.extensions["PIPELINING"] = ""  # as if the server had advertised it
    replies = TransactionReplies()
    with pytest.raises(SmtpError):
        await connection.send_mail(
            *lines("MAIL FROM:<s@sender.test>"), lines("RCPT TO:<a@d.test>"), b".\r\n", replies,
            command_timeout=2, data_timeout=2,
        )  # fmt: skip
    assert server.violations == ["RCPT TO:<a@d.test>"]


async def test_replies_dripping_one_byte_per_segment(client: SmtpClient, servers: list[RawServer]) -> None:
    server = await serve(servers, drip=True)
    target = SmtpTarget("127.0.0.1", server.port)
    outcomes = await client.deliver(target, request(["a@d.test", "b@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0", 250)] * 2
    assert server.messages == [CONTENT]


async def test_all_recipients_refused_in_a_group_sends_no_content_and_keeps_the_connection(
    client: SmtpClient, servers: list[RawServer]
) -> None:
    server = await serve(
        servers,
        hold_until_data=True,
        rcpt_replies={"x@d.test": "550 5.1.1 no such user", "y@d.test": "553 5.1.3 bad address"},
    )
    target = SmtpTarget("127.0.0.1", server.port)
    outcomes = await client.deliver(target, request(["x@d.test", "y@d.test"]))
    assert dispositions(outcomes) == [("bounced", "5.1.1", 550), ("bounced", "5.1.3", 553)]
    assert server.messages == []
    assert server.commands[-1] == "RSET"  # the open transaction (MAIL accepted) is reset
    outcomes = await client.deliver(target, request(["a@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0", 250)]
    assert server.messages == [CONTENT]
    assert len(server.sessions) == 1


async def test_all_refused_but_data_answered_354_ends_with_a_lone_dot(
    client: SmtpClient, servers: list[RawServer]
) -> None:
    """RFC 2920 3.1: a (broken) server that accepts DATA anyway gets a single dot, no content."""

    def data_always(session: RawSession, line: str) -> str | None:
        if line == "DATA":
            session.in_data = True
            return "354 go ahead anyway"
        return None

    server = await serve(servers, answer=data_always, rcpt_replies={"x@d.test": "550 5.1.1 no such user"})
    target = SmtpTarget("127.0.0.1", server.port)
    outcomes = await client.deliver(target, request(["x@d.test"]))
    assert dispositions(outcomes) == [("bounced", "5.1.1", 550)]
    assert server.messages == [b""]  # the lone dot
    assert dispositions(await client.deliver(target, request(["a@d.test"]))) == [("delivered", "2.0.0", 250)]
    assert server.messages == [b"", CONTENT]
    assert len(server.sessions) == 1


async def test_some_recipients_refused_content_sent_once(
    client: SmtpClient, servers: list[RawServer]
) -> None:
    server = await serve(servers, hold_until_data=True, rcpt_replies={"b@d.test": "452 4.2.2 mailbox full"})
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", server.port), request(["a@d.test", "b@d.test", "c@d.test"])
    )
    assert dispositions(outcomes) == [
        ("delivered", "2.0.0", 250),
        ("deferred", "4.2.2", 452),
        ("delivered", "2.0.0", 250),
    ]
    assert server.messages == [CONTENT]


async def test_mail_refused_in_a_group_applies_to_every_recipient(
    client: SmtpClient, servers: list[RawServer]
) -> None:
    def refuse_mail(session: RawSession, line: str) -> str | None:
        if line.startswith("MAIL"):
            return "550 5.7.1 sender rejected"
        if line.startswith(("RCPT", "DATA")):
            return "503 5.5.1 need MAIL first"
        return None

    server = await serve(servers, hold_until_data=True, answer=refuse_mail)
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", server.port), request(["a@d.test", "b@d.test"]))
    assert dispositions(outcomes) == [("bounced", "5.7.1", 550)] * 2
    assert outcomes[0].text == "sender rejected"
    assert server.messages == []


async def test_data_refused_after_accepted_recipients_resets_before_reuse(
    client: SmtpClient, servers: list[RawServer]
) -> None:
    refused = [True]

    def refuse_data_once(session: RawSession, line: str) -> str | None:
        if line == "DATA" and refused[0]:
            refused[0] = False
            session.in_data = False
            return "451 4.3.0 try again later"
        return None

    server = await serve(servers, answer=refuse_data_once)
    target = SmtpTarget("127.0.0.1", server.port)
    assert dispositions(await client.deliver(target, request(["a@d.test"]))) == [("deferred", "4.3.0", 451)]
    assert server.commands[-1] == "RSET"
    assert dispositions(await client.deliver(target, request(["b@d.test"]))) == [("delivered", "2.0.0", 250)]
    assert len(server.sessions) == 1


# --------------------------------------------------------------------------- broken servers


async def test_server_closing_with_421_mid_group(client: SmtpClient, servers: list[RawServer]) -> None:
    def close_at_second_rcpt(session: RawSession, line: str) -> str | None:
        if line == "RCPT TO:<b@d.test>":
            assert session.transport is not None
            session.transport.write(b"421 4.3.2 shutting down\r\n")
            session.transport.close()
            session.transport = None
        return None

    server = await serve(servers, answer=close_at_second_rcpt)
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", server.port), request(["a@d.test", "b@d.test", "c@d.test"])
    )
    assert [o.disposition.value for o in outcomes] == ["deferred"] * 3
    assert outcomes[1].status == "4.3.2" and outcomes[1].code == 421
    assert outcomes[2].status == "4.4.2"
    assert server.messages == []
    assert client.idle_connections() == 0


async def test_server_vanishing_after_mail_defers_4_4_2(client: SmtpClient, servers: list[RawServer]) -> None:
    def vanish(session: RawSession, line: str) -> str | None:
        if line.startswith("RCPT") and session.transport is not None:
            session.transport.abort()
            session.transport = None
        return None

    server = await serve(servers, hold_until_data=True, answer=vanish)
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", server.port), request(["a@d.test"]))
    assert dispositions(outcomes) == [("deferred", "4.4.2", 421)]


@pytest.mark.parametrize(
    "bad_reply",
    [
        b"hello there\r\n",  # no code
        b"25 short\r\n",
        b"250x ok\r\n",  # neither SP nor '-' after the code
        b"650 6.0.0 no such class\r\n",
        b"250 " + b"x" * (smtp_client.MAX_LINE_BYTES + 10) + b"\r\n",  # overlong line
        b"250 " + b"x" * (smtp_client.MAX_LINE_BYTES + 10),  # overlong, never ends
        b"250-x\r\n" * (smtp_client.MAX_REPLY_BYTES // 7 + 1) + b"250 end\r\n",  # endless reply
    ],
    ids=["no-code", "short-code", "bad-separator", "bad-class", "long-line", "long-unended", "huge-reply"],
)
async def test_malformed_or_oversize_reply_defers_4_4_2(
    client: SmtpClient, servers: list[RawServer], bad_reply: bytes
) -> None:
    server = await serve(servers, answer=lambda session, line: bad_reply if line.startswith("MAIL") else None)
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", server.port), request(["a@d.test", "b@d.test"]))
    assert dispositions(outcomes) == [("deferred", "4.4.2", 421)] * 2
    assert server.messages == []
    assert client.idle_connections() == 0


async def test_oversize_ehlo_reply_defers_4_4_2(client: SmtpClient, servers: list[RawServer]) -> None:
    huge = [f"X-KEYWORD-{i} " + "p" * 100 for i in range(1000)]
    server = await serve(servers, extensions=huge)
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", server.port), request(["a@d.test"]))
    assert dispositions(outcomes) == [("deferred", "4.4.2", 421)]


async def test_unsolicited_reply_breaks_the_connection(servers: list[RawServer]) -> None:
    server = await serve(servers)
    connection = await connect(server)
    assert connection.is_connected
    server.sessions[0].send(b"421 4.4.2 idle too long\r\n")
    with pytest.raises(SmtpProtocolError, match="unsolicited"):
        await connection.read_reply(2)
    assert not connection.is_connected


async def test_reply_timeout_aborts_and_raises(servers: list[RawServer]) -> None:
    server = await serve(servers, answer=lambda session, line: b"" if line == "NOOP" else None)
    connection = await connect(server)
    with pytest.raises(SmtpTimeout):
        await connection.command(b"NOOP\r\n", 0.2)
    assert not connection.is_connected


async def test_connection_loss_wakes_the_waiter(servers: list[RawServer]) -> None:
    def hang_up(session: RawSession, line: str) -> bytes | None:
        if line == "NOOP" and session.transport is not None:
            session.transport.close()
            session.transport = None
            return b""
        return None

    server = await serve(servers, answer=hang_up)
    connection = await connect(server)
    with pytest.raises(SmtpConnectionLost):
        await connection.command(b"NOOP\r\n", 30)


async def test_large_content_waits_for_the_transport_to_drain(servers: list[RawServer]) -> None:
    """A server that stops reading: the client waits for the drain (not for the final reply),
    within the data timeout."""
    server = await serve(servers, pause_reading_after_354=True)
    connection = await connect(server)
    with pytest.raises(SmtpTimeout, match="read the content"):
        await connection.send_mail(
            *lines("MAIL FROM:<s@sender.test>"), lines("RCPT TO:<a@d.test>"),
            b"x" * 1000 + b"\r\n" * 20_000_000 + b".\r\n", TransactionReplies(),
            command_timeout=2, data_timeout=0.3,
        )  # fmt: skip


async def test_large_content_goes_through_flow_control(client: SmtpClient, servers: list[RawServer]) -> None:
    server = await serve(servers)
    content = b"".join(b"line %d of a large message\r\n" % i for i in range(100_000))
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", server.port), request(["a@d.test"], content))
    assert dispositions(outcomes) == [("delivered", "2.0.0", 250)]
    assert server.messages == [content]


class EarlyRefusal(asyncio.Protocol):
    """Takes the envelope, answers DATA with 354, reads one piece of the content, then answers
    ``552`` before the final dot and stops reading (as a server does for a message too big)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"220 early.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.in_data:
            self.transport.write(b"552 5.3.4 Message too big for this system\r\n")
            self.transport.pause_reading()
            return
        self.buffer += data
        while b"\r\n" in self.buffer and not self.in_data:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-early.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.transport.write(b"354 go ahead\r\n")
            else:
                self.transport.write(b"250 2.0.0 ok\r\n")


async def test_a_final_reply_before_the_content_is_read_is_the_outcome(client: SmtpClient) -> None:
    """A 552 that arrives while the client still waits for its content to drain is the answer
    to the message (a bounce), not a broken connection to retry, and that connection, with
    content still unsent, is never used again."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EarlyRefusal, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    content = b"".join(b"line %d of a message too big\r\n" % i for i in range(400_000))
    try:
        outcomes = await client.deliver(SmtpTarget("127.0.0.1", port), request(["a@d.test"], content))
    finally:
        server.close()
    assert dispositions(outcomes) == [("bounced", "5.3.4", 552)]
    assert client.idle_connections() == 0


# --------------------------------------------------------------------------- session commands


async def test_ehlo_extensions_and_helo_fallback(servers: list[RawServer]) -> None:
    server = await serve(servers, extensions=["size 5000", "Auth PLAIN login", "8bitmime"])
    connection = await connect(server)
    assert connection.supports("SIZE") and connection.supports("pipelining") and connection.esmtp
    assert connection.extensions["SIZE"] == "5000"
    assert connection.auth_mechanisms == ["PLAIN", "LOGIN"]
    connection.close()

    old = await serve(
        servers, answer=lambda s, line: "502 5.5.1 no EHLO" if line.startswith("EHLO") else None
    )
    connection = await connect(old)
    assert not connection.esmtp and connection.extensions == {}
    assert old.commands[:2] == ["EHLO relay.test", "HELO relay.test"]
    replies = await connection.send_mail(
        *lines("MAIL FROM:<s@sender.test>"), lines("RCPT TO:<a@d.test>"), b"x\r\n.\r\n", TransactionReplies(),
        command_timeout=2, data_timeout=2,
    )  # fmt: skip
    assert replies.final is not None and replies.final.code == 250
    connection.close()


async def test_greeting_refused(servers: list[RawServer]) -> None:
    server = await serve(servers, greeting=b"554-5.3.2 no service\r\n554 here\r\n")
    with pytest.raises(SmtpReplyError) as info:
        await SmtpConnection.open("127.0.0.1", server.port, timeout=2)
    assert info.value.reply == ServerReply(554, "5.3.2 no service\nhere")


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        ("AUTH LOGIN PLAIN", ["AUTH PLAIN " + base64.b64encode(b"\0relay\0s3cr\xc3\xa9t").decode()]),
        (
            "AUTH LOGIN",
            ["AUTH LOGIN", base64.b64encode(b"relay").decode(), base64.b64encode(b"s3cr\xc3\xa9t").decode()],
        ),
        ("AUTH=LOGIN", ["AUTH LOGIN", "cmVsYXk=", base64.b64encode(b"s3cr\xc3\xa9t").decode()]),
    ],
)
async def test_auth_plain_or_login(servers: list[RawServer], offered: str, expected: list[str]) -> None:
    server = await serve(servers, extensions=[offered])
    connection = await connect(server)
    await connection.authenticate("relay", "s3crét", 2)
    assert server.commands[1:] == expected
    connection.close()


async def test_reply_injected_after_starttls_220_fails_the_session(servers: list[RawServer]) -> None:
    """RFC 3207 4.2: nothing may follow the 220 in cleartext; a client that read it as the
    reply to its next (encrypted) command could be fooled."""
    server = await serve(
        servers,
        extensions=["STARTTLS"],
        answer=lambda s, line: b"220 2.0.0 ready\r\n250 injected\r\n" if line == "STARTTLS" else None,
    )
    connection = await connect(server)
    with pytest.raises(SmtpProtocolError, match="unsolicited"):
        await connection.starttls(ssl.create_default_context(), "raw.test", 2)
    assert not connection.is_connected


async def test_auth_without_a_known_mechanism(servers: list[RawServer]) -> None:
    server = await serve(servers, extensions=["AUTH CRAM-MD5"])
    connection = await connect(server)
    with pytest.raises(SmtpError, match="no supported AUTH mechanism"):
        await connection.authenticate("relay", "x", 2)


async def test_unsafe_command_is_never_sent(client: SmtpClient, servers: list[RawServer]) -> None:
    with pytest.raises(UnsafeCommand):
        command_line(b"RCPT TO:<a@d.test>\r\nRSET")
    server = await serve(servers)
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", server.port), request(["a@d.test\r\nDATA"]))
    assert dispositions(outcomes) == [("bounced", "5.1.3", 553)]
    assert not any(c.startswith(("MAIL", "RCPT")) for c in server.commands)


# --------------------------------------------------------------------------- pure parts


def test_several_replies_in_one_segment_are_all_kept() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250 2.1.0 ok\r\n250-2.1.5 first\r\n250 second\r\n354 go\r\n") == 3
    assert [parser.pop() for _ in range(3)] == [
        ServerReply(250, "2.1.0 ok"),
        ServerReply(250, "2.1.5 first\nsecond"),
        ServerReply(354, "go"),
    ]
    assert parser.idle


def test_reply_split_byte_by_byte() -> None:
    parser = ReplyParser()
    data = b"250-mx.test hello\r\n250-PIPELINING\r\n250 SIZE 10\r\n221 bye\n"
    completed = sum(parser.feed(data[i : i + 1]) for i in range(len(data)))
    assert completed == 2
    assert parser.pop() == ServerReply(250, "mx.test hello\nPIPELINING\nSIZE 10")
    assert parser.pop() == ServerReply(221, "bye")  # a bare LF ends a line too
    assert parser.idle


def test_reply_without_text() -> None:
    parser = ReplyParser()
    parser.feed(b"250\r\n")
    assert parser.pop() == ServerReply(250, "")


def test_parse_extensions() -> None:
    assert parse_extensions("mx.test hi\nPIPELINING\nsize 100\nAuth Plain Login\nAUTH=PLAIN\n8BITMIME") == {
        "PIPELINING": "",
        "SIZE": "100",
        "AUTH": "Plain Login",
        "8BITMIME": "",
    }
    assert parse_extensions("mx.test\nAUTH=LOGIN PLAIN") == {"AUTH": "LOGIN PLAIN"}


# --------------------------------------------------------------------------- uvloop


def test_the_wire_under_uvloop() -> None:
    """The relay process runs on uvloop (its transports are no asyncio.Transport subclasses):
    pipelined and lockstep transactions, a malformed reply and a vanished server there too."""

    async def scenario() -> list[list[tuple[str, str, int]]]:
        started: list[RawServer] = []
        client = SmtpClient("relay.test", QUEUE)
        try:
            pipelined = await serve(
                started, hold_until_data=True, rcpt_replies={"x@d.test": "550 5.1.1 unknown"}
            )
            lockstep = await serve(started, pipelining=False, strict_lockstep=True)
            malformed = await serve(started, answer=lambda s, line: b"bogus\r\n" if line == "DATA" else None)
            results = []
            for server in (pipelined, pipelined, lockstep, malformed):
                outcomes = await client.deliver(
                    SmtpTarget("127.0.0.1", server.port), request(["a@d.test", "x@d.test"])
                )
                results.append(dispositions(outcomes))
            assert pipelined.messages == [CONTENT, CONTENT] and len(pipelined.sessions) == 1
            assert lockstep.messages == [CONTENT] and lockstep.violations == []
            return results
        finally:
            await client.close()
            for server in started:
                await server.stop()

    delivered, unknown = ("delivered", "2.0.0", 250), ("bounced", "5.1.1", 550)
    assert uvloop.run(scenario()) == [
        [delivered, unknown],
        [delivered, unknown],
        [delivered, delivered],
        [("deferred", "4.4.2", 421)] * 2,
    ]
