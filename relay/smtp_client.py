"""The SMTP client wire protocol of next-hop delivery: one connection, commands and replies.

`relay.delivery` opens an `SmtpConnection` per pooled session and runs its transactions with
`SmtpConnection.send_mail`; everything about what a reply means for a recipient (outcomes,
pooling, retries, TLS policy) is decided there, not here. This module only speaks the wire:
connect (optionally TLS from the first byte), the greeting, EHLO with HELO fallback and the
extensions it advertises (RFC 5321 4.1.1.1, RFC 1869), STARTTLS (RFC 3207), AUTH PLAIN or LOGIN
(RFC 4954, RFC 4616), RSET, QUIT, and one mail transaction (RFC 5321 3.3).

Why our own client (measured, bench/RESULTS.md and issue 7): aiosmtplib 5.1.3 keeps one reply
waiter and drops a reply that arrives while the previous one is not yet picked up, so it cannot
pipeline; each message cost four round trips (MAIL, RCPT, DATA, content), each with a send(),
an event-loop wakeup and an ``asyncio.wait_for``, and the delivery side was ~40% of the relay's
CPU. Here, when the server advertises PIPELINING (RFC 2920), MAIL, every RCPT and DATA go out in
one write and the content in a second one: two round trips per message.

How it keeps that cheap and safe:
- an ``asyncio.Protocol`` (no streams), `ReplyChannel`, under the commands of `SmtpConnection`;
  every complete reply that arrives is parsed into a deque, so several replies in one segment,
  or replies that arrive before anyone waits for them, are never lost; a reply that arrives
  when none is outstanding breaks the connection (it cannot be paired with a command);
- a reply line is at most `MAX_LINE_BYTES`, a reply at most `MAX_REPLY_BYTES`, and at most
  `MAX_QUEUED_BYTES` of unread replies are kept: a hostile server cannot make us buffer without
  bound; an overlong or malformed line (RFC 5321 4.2: three digits, then SP, ``-`` or the end)
  is a `SmtpProtocolError` and the connection is aborted;
- each awaited reply has its own timeout, one ``loop.call_later`` handle (no ``wait_for``); a
  timeout aborts the connection (replies could no longer be paired with commands), and a lost
  connection wakes the waiter with `SmtpConnectionLost`;
- a 421 reply anywhere means the server is closing (RFC 5321 3.8): the connection is closed and
  no further reply is waited for;
- large content respects transport flow control: after writing it, the client waits for the
  transport to drain before it waits for the final reply.

RFC 2920 3.1 in `send_mail`: MAIL refused -> the RCPT and DATA replies are read and ignored;
every RCPT refused -> DATA's reply is read, no content is sent (a server that answers 354
anyway gets a lone ``.``, as RFC 2920 3.1 says, and that reply is discarded); some refused ->
the content goes once and the per-recipient replies are kept. Without PIPELINING the client
sends one command and waits for its reply before the next.

Nothing here raises library exceptions to the caller: connection failures are `SmtpConnectError`,
TLS handshake failures `SmtpTlsError`, an unexpected reply to a session command
`SmtpReplyError`, and anything that leaves the connection unusable `SmtpProtocolError`.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import cast

MAX_LINE_BYTES = 8192  # RFC 5321 4.5.3.1.5 says 512; real servers send longer EHLO lines
MAX_REPLY_BYTES = 65536  # one (multi-line) reply
MAX_QUEUED_BYTES = 1 << 20  # replies received but not yet read by the client

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ServerReply:
    """One reply a server sent us: its code and its text (the lines after the code, joined with
    ``\\n``). Not `relay.core.status.Reply`, which is a reply the front sends."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SmtpError(Exception):
    """Base of every error this module raises."""


class SmtpConnectError(SmtpError):
    """No session: the TCP connection (or the greeting) failed or timed out."""


class SmtpTlsError(SmtpError):
    """The TLS handshake (implicit TLS or STARTTLS) failed."""


class SmtpReplyError(SmtpError):
    """A session command (greeting, EHLO, STARTTLS, AUTH, ...) got an unexpected reply."""

    def __init__(self, command: str, reply: ServerReply) -> None:
        super().__init__(f"{command}: {reply}")
        self.command = command
        self.reply = reply


class SmtpProtocolError(SmtpError):
    """The connection is unusable: malformed or oversize reply, timeout, unsolicited reply."""


class SmtpConnectionLost(SmtpProtocolError):
    """The connection closed while a reply was awaited."""


class SmtpTimeout(SmtpProtocolError):
    """No reply within the timeout."""


class UnsafeCommand(SmtpError):
    """A command argument contains a control character (CR, LF, NUL, ...): nothing was sent."""


# --------------------------------------------------------------------------- reply parsing


class ReplyParser:
    """Bytes in, complete replies out (RFC 5321 4.2). Keeps a partial line between calls."""

    def __init__(self) -> None:
        self.replies: deque[ServerReply] = deque()
        self.queued_bytes = 0
        self._partial = b""
        self._lines: list[str] = []
        self._reply_bytes = 0

    def clear(self) -> None:
        self.replies.clear()
        self.queued_bytes = 0
        self._partial = b""
        self._lines = []
        self._reply_bytes = 0

    @property
    def idle(self) -> bool:
        """Nothing buffered: no reply, no partial reply."""
        return not self.replies and not self._partial and not self._lines

    def feed(self, data: bytes) -> int:
        """Parse `data`; return how many replies it completed. Raises SmtpProtocolError."""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        completed = 0
        start = 0
        find = data.find
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            start = end + 1
            if len(line) > MAX_LINE_BYTES:
                raise SmtpProtocolError(f"reply line longer than {MAX_LINE_BYTES} bytes")
            if self._line(line):
                completed += 1
        rest = data[start:] if start else data
        if len(rest) > MAX_LINE_BYTES:
            raise SmtpProtocolError(f"reply line longer than {MAX_LINE_BYTES} bytes")
        self._partial = rest
        return completed

    def _line(self, line: bytes) -> bool:
        if line.endswith(b"\r"):
            line = line[:-1]
        head = line[:3]
        separator = line[3:4]
        if (
            len(head) != 3
            or not head.isdigit()
            or head[0] not in b"2345"
            or separator not in (b" ", b"-", b"")
        ):
            shown = line[:80].decode("ascii", "backslashreplace")
            raise SmtpProtocolError(f"malformed reply line: {shown!r}")
        self._reply_bytes += len(line) + 2
        if self._reply_bytes > MAX_REPLY_BYTES:
            raise SmtpProtocolError(f"reply longer than {MAX_REPLY_BYTES} bytes")
        self._lines.append(line[4:].strip(b" \t").decode("utf-8", "surrogateescape"))
        if separator == b"-":
            return False
        # RFC 5321 4.2.1: every line carries the same code; the last one is authoritative
        reply = ServerReply(int(head), self._lines[0] if len(self._lines) == 1 else "\n".join(self._lines))
        self.queued_bytes += self._reply_bytes
        if self.queued_bytes > MAX_QUEUED_BYTES:
            raise SmtpProtocolError(f"more than {MAX_QUEUED_BYTES} bytes of unread replies")
        self.replies.append(reply)
        self._lines = []
        self._reply_bytes = 0
        return True

    def pop(self) -> ServerReply:
        reply = self.replies.popleft()
        if not self.replies:
            self.queued_bytes = 0
        return reply


def parse_extensions(ehlo_text: str) -> dict[str, str]:
    """EHLO reply text -> {KEYWORD: parameters} (RFC 1869 4.3; keywords are case-insensitive,
    the first line is the server's name). The old-style ``AUTH=PLAIN LOGIN`` counts as AUTH."""
    extensions: dict[str, str] = {}
    for line in ehlo_text.split("\n")[1:]:
        line = line.strip()
        if not line:
            continue
        keyword, _, params = line.partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            params = f"{keyword[5:]} {params}".strip()
            keyword = "AUTH"
            if "AUTH" in extensions:
                continue  # the RFC 4954 form wins
        extensions[keyword] = params.strip()
    return extensions


def command_line(*parts: bytes) -> bytes:
    """``parts`` joined by spaces with CRLF; refuses control characters (command injection)."""
    line = b" ".join(parts)
    if _CONTROL.search(line):
        raise UnsafeCommand(f"command contains a control character: {line[:80]!r}")
    return line + b"\r\n"


# --------------------------------------------------------------------------- transactions


@dataclass
class TransactionReplies:
    """What the server answered in one transaction, filled in as replies arrive; a field left
    None (or a short `recipients` list) means that reply was never read: the connection broke
    or the server closed it with 421 before."""

    mail: ServerReply | None = None
    recipients: list[ServerReply] = field(default_factory=list)
    data: ServerReply | None = None  # the reply to DATA (354 when content followed)
    final: ServerReply | None = None  # the reply after the content and its final dot
    content_sent: bool = False


@dataclass(frozen=True, slots=True)
class _Exchange:
    """One `send_mail` call's arguments, for the pipelined and the lockstep way of sending."""

    mail: bytes
    recipients: list[bytes]
    payload: bytes
    replies: TransactionReplies
    command_timeout: float | None
    data_timeout: float | None


# --------------------------------------------------------------------------- the connection


class ReplyChannel(asyncio.Protocol):
    """The wire under a client session: writes that owe replies, replies read in order, one
    timer per awaited reply, flow control, and the error that made the connection unusable."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = ReplyParser()
        self._outstanding = 1  # replies the server still owes us: the greeting first
        self._error: SmtpError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    # ------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            completed = self._parser.feed(data)
        except SmtpProtocolError as exc:
            self._fail(exc)
            return
        if not completed:
            return
        self._outstanding -= completed
        if self._outstanding < 0:  # nothing to pair it with: no reply can be trusted now
            last = self._parser.replies[-1]
            self._parser.clear()
            self._fail(SmtpProtocolError(f"unsolicited reply from the server: {last}"))
            return
        self._wake()  # a reader, or a content write waiting to drain (an early final reply)

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._error is None:
            lost = SmtpConnectionLost(f"connection lost: {exc}" if exc else "connection closed by the server")
            if exc is not None:
                lost.__cause__ = exc
            self._error = lost
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # ------------------------------------------------------------- plumbing

    def _fail(self, error: SmtpError) -> None:
        """The connection is unusable: remember why, abort it, wake whoever waits."""
        if self._error is None:
            self._error = error
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    def _wake(self) -> None:
        for future in (self._waiter, self._drain):
            if future is not None and not future.done():
                future.set_result(None)

    def _expire(self, what: str) -> None:
        if self._parser.replies:  # the reply came in the same loop iteration as the timer
            return
        self._fail(SmtpTimeout(f"timed out waiting for {what}"))

    @property
    def is_connected(self) -> bool:
        transport = self._transport
        return self._error is None and transport is not None and not transport.is_closing()

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def close(self) -> None:
        """Close now (buffered output is still flushed); idempotent."""
        if self._transport is not None:
            self._transport.close()
        if self._error is None:
            self._error = SmtpConnectionLost("connection closed by the client")

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        if self._error is None:
            self._error = SmtpConnectionLost("connection aborted by the client")

    def _write(self, data: bytes, replies: int) -> None:
        """Send `data`, for which the server owes `replies` replies."""
        if self._error is not None:
            raise self._error
        transport = self._transport
        if transport is None or transport.is_closing():
            raise SmtpConnectionLost("connection closed")
        self._outstanding += replies
        transport.write(data)

    async def read_reply(self, timeout: float | None, what: str = "a reply") -> ServerReply:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        """The next reply, waiting at most `timeout` seconds for it."""
        parser = self._parser
        if parser.replies:
            return parser.pop()
        if self._error is not None:
            raise self._error
        waiter = self._loop.create_future()
        self._waiter = waiter
        handle = self._loop.call_later(timeout, self._expire, what) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()
        if parser.replies:
            return parser.pop()
        assert self._error is not None
        raise self._error

    async def _drained(self, timeout: float | None) -> None:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        """Wait until the transport's write buffer is below its high-water mark."""
        if not self._paused or self._error is not None:
            return
        drain = self._loop.create_future()
        self._drain = drain
        handle = (
            self._loop.call_later(timeout, self._expire, "the server to read the content")
            if timeout is not None
            else None
        )
        try:
            await drain
        finally:
            self._drain = None
            if handle is not None:
                handle.cancel()
        if self._error is not None and not self._parser.replies:
            raise self._error

    async def command(self, line: bytes, timeout: float | None) -> ServerReply:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        """Send one command line (with CRLF) and read its reply."""
        self._write(line, 1)
        reply = await self.read_reply(timeout, line.split(b" ", 1)[0].strip().decode("ascii", "replace"))
        if reply.code == 421:
            self.close()  # RFC 5321 3.8: the server is closing the session
        return reply


class SmtpConnection(ReplyChannel):
    """One client SMTP session over an asyncio transport. Use `SmtpConnection.open`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls = False

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def auth_mechanisms(self) -> list[str]:
        return self.extensions.get("AUTH", "").upper().split()

    # ------------------------------------------------------------- session

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        timeout: float,  # noqa: ASYNC109 (a timer per reply; see the docstring)
        tls_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> SmtpConnection:
        """Connect (TLS from the first byte when `tls_context` is given) and read the greeting,
        all within `timeout`. Raises SmtpConnectError, SmtpTlsError or SmtpReplyError."""
        loop = asyncio.get_running_loop()
        connection = cls(loop)
        try:
            async with asyncio.timeout(timeout):
                try:
                    await loop.create_connection(
                        lambda: connection,
                        host,
                        port,
                        ssl=tls_context,
                        server_hostname=(server_hostname or host) if tls_context is not None else None,
                    )
                except ssl.SSLError as exc:
                    raise SmtpTlsError(f"TLS handshake failed: {exc}") from exc
                connection.tls = tls_context is not None
                greeting = await connection.read_reply(None, "the greeting")
        except TimeoutError as exc:
            connection.abort()
            raise SmtpConnectError(f"timed out after {timeout:g} s") from exc
        except OSError as exc:
            connection.abort()
            raise SmtpConnectError(str(exc) or type(exc).__name__) from exc
        except SmtpProtocolError as exc:
            connection.abort()
            if isinstance(exc.__cause__, ssl.SSLError):
                raise SmtpTlsError(f"TLS session failed: {exc.__cause__}") from exc
            raise SmtpConnectError(f"no greeting: {exc}") from exc
        except BaseException:
            connection.abort()
            raise
        if greeting.code != 220:
            connection.close()
            raise SmtpReplyError("greeting", greeting)
        return connection

    async def hello(self, name: str, timeout: float | None) -> ServerReply:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        """EHLO, or HELO when EHLO is refused with 5xx; records the extensions."""
        encoded = name.encode("ascii")
        reply = await self.command(command_line(b"EHLO", encoded), timeout)
        if reply.code == 250:
            self.esmtp = True
            self.extensions = parse_extensions(reply.text)
            return reply
        if 500 <= reply.code < 600:
            reply = await self.command(command_line(b"HELO", encoded), timeout)
            if reply.code == 250:
                self.esmtp = False
                self.extensions = {}
                return reply
        raise SmtpReplyError("EHLO", reply)

    async def starttls(self, context: ssl.SSLContext, server_hostname: str, timeout: float | None) -> None:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        """STARTTLS and the handshake (RFC 3207); the caller says EHLO again afterwards.
        Raises SmtpReplyError (refused), SmtpTlsError (handshake) or SmtpProtocolError."""
        reply = await self.command(b"STARTTLS\r\n", timeout)
        if reply.code != 220:
            raise SmtpReplyError("STARTTLS", reply)
        # RFC 3207 4.2 (injection): a server sends nothing after 220 until TLS is up. A complete
        # reply that came with the 220 already failed the session (unsolicited); a partial one
        # was not protected by TLS and is dropped here
        self._parser.clear()
        self._outstanding = 0
        transport = self._transport
        if transport is None or self._error is not None:
            raise self._error or SmtpConnectionLost("connection closed")
        try:
            tls_transport = await self._loop.start_tls(
                transport,
                self,
                context,
                server_side=False,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self.abort()
            transport.abort()
            raise SmtpTlsError(f"TLS handshake failed: {exc}") from exc
        if tls_transport is None:  # pragma: no cover - the connection closed during the handshake
            raise SmtpConnectionLost("connection closed during the TLS handshake")
        self._transport = tls_transport
        self.tls = True
        self.extensions = {}

    async def authenticate(self, username: str, password: str, timeout: float | None) -> None:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        """AUTH PLAIN (RFC 4616), or LOGIN when PLAIN is not offered (RFC 4954).
        Raises SmtpReplyError on refusal, SmtpError when no mechanism fits."""
        mechanisms = self.auth_mechanisms
        user = username.encode("utf-8")
        secret = password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            reply = await self.command(b"AUTH PLAIN " + token + b"\r\n", timeout)
            if reply.code != 235:
                raise SmtpReplyError("AUTH PLAIN", reply)
            return
        if "LOGIN" in mechanisms:
            reply = await self.command(b"AUTH LOGIN\r\n", timeout)
            for value in (user, secret):
                if reply.code != 334:
                    raise SmtpReplyError("AUTH LOGIN", reply)
                reply = await self.command(base64.b64encode(value) + b"\r\n", timeout)
            if reply.code != 235:
                raise SmtpReplyError("AUTH LOGIN", reply)
            return
        offered = " ".join(mechanisms) or "no AUTH"
        raise SmtpError(f"no supported AUTH mechanism (the server offers {offered})")

    async def rset(self, timeout: float | None) -> ServerReply:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        return await self.command(b"RSET\r\n", timeout)

    async def quit(self, timeout: float | None) -> None:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        """QUIT and close; errors are the caller's to ignore."""
        try:
            await self.command(b"QUIT\r\n", timeout)
        finally:
            self.close()

    # ------------------------------------------------------------- one transaction

    async def send_mail(
        self,
        mail: bytes,
        recipients: list[bytes],
        payload: bytes,
        replies: TransactionReplies,
        *,
        command_timeout: float | None,
        data_timeout: float | None,
    ) -> TransactionReplies:
        """One transaction: `mail` and `recipients` are complete command lines (`command_line`),
        `payload` the dot-stuffed content with its final ``.<CRLF>``. Fills `replies` as they
        arrive (the caller keeps them when this raises SmtpProtocolError)."""
        exchange = _Exchange(mail, recipients, payload, replies, command_timeout, data_timeout)
        if "PIPELINING" in self.extensions:
            await self._pipelined(exchange)
        else:
            await self._lockstep(exchange)
        return replies

    async def _pipelined(self, x: _Exchange) -> None:
        # RFC 2920 3.1: MAIL, RCPT and DATA may go in one group; DATA ends the group
        self._write(b"".join((x.mail, *x.recipients, b"DATA\r\n")), len(x.recipients) + 2)
        read = self.read_reply
        x.replies.mail = await read(x.command_timeout, "the reply to MAIL")
        if x.replies.mail.code == 421:
            self.close()
            return
        mail_ok = x.replies.mail.code == 250
        accepted = False
        for _ in x.recipients:
            reply = await read(x.command_timeout, "the reply to RCPT")
            x.replies.recipients.append(reply)
            if reply.code == 421:
                self.close()
                return
            if reply.code in (250, 251):
                accepted = True
        x.replies.data = reply = await read(x.command_timeout, "the reply to DATA")
        if reply.code == 421:
            self.close()
            return
        if reply.code != 354:
            return
        if not (mail_ok and accepted):  # a broken server asks for content of no transaction
            await self._discard_data(x.command_timeout)
            return
        await self._send_content(x.payload, x.replies, x.data_timeout)

    async def _lockstep(self, x: _Exchange) -> None:
        x.replies.mail = await self.command(x.mail, x.command_timeout)
        if x.replies.mail.code != 250:
            return
        accepted = False
        for line in x.recipients:
            reply = await self.command(line, x.command_timeout)
            x.replies.recipients.append(reply)
            if reply.code == 421:
                return
            if reply.code in (250, 251):
                accepted = True
        if not accepted:
            return
        x.replies.data = await self.command(b"DATA\r\n", x.command_timeout)
        if x.replies.data.code == 354:
            await self._send_content(x.payload, x.replies, x.data_timeout)

    async def _send_content(
        self, payload: bytes, replies: TransactionReplies, data_timeout: float | None
    ) -> None:
        self._write(payload, 1)
        replies.content_sent = True
        await self._drained(data_timeout)
        # RFC 5321 4.5.3.2.6: wait long for the reply to the final dot (a retry would duplicate)
        replies.final = await self.read_reply(data_timeout, "the reply to the final dot")
        if replies.final.code == 421 or self._paused:
            # closing, or the server answered before it read all the content (a 552 for a
            # message too big, say): what is left in our buffer must never reach it as commands
            self.abort()

    async def _discard_data(self, timeout: float | None) -> None:  # noqa: ASYNC109 (a timer per reply; see the docstring)
        """RFC 2920 3.1: DATA accepted with no valid recipient: end it with a lone dot."""
        reply = await self.command(b".\r\n", timeout)
        if reply.code == 421:
            self.close()
