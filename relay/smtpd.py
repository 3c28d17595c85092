"""The aiosmtpd glue under the front's sessions: one TCP connection's session slot, its TLS
layer, idle timer, replies and command loop. The commands themselves are relay.front_session's.

aiosmtpd 1.4.6's `SMTP` class keeps the socket, the stream reader and writer and the session
object; everything a relay must be strict about is overridden here:

- The session slot (counted against ``limits.maxConnections`` and ``maxConnectionsPerClient``
  and in the ``mailrelay_smtp_sessions`` gauge; `Front.admit`/`Front.release`) is taken when the
  TCP connection is accepted and given back exactly once when that connection closes, however
  the session ends: by the client, a reset, the idle timer, the server, a drain, a TLS handshake
  that failed, timed out or never began. TLS (STARTTLS, and implicit TLS from the first byte) is
  layered here with relay.tls.ServerTls, whose end is reported even without a handshake; a
  handshake must complete within `Front.tls_handshake_timeout` (30 s).
- The command loop reads one CRLF-terminated line at a time and answers in order (pipelining).
  A line over ``limits.maxCommandLine`` is skipped and answered ``500 5.5.2``; a line ended by a
  bare LF is refused with ``501 5.5.2`` and the connection closed (where the next command starts
  is ambiguous; Postfix's smtpd_forbid_bare_newline=reject also disconnects); a bare CR or a
  control character inside a line is refused and the session goes on (relay.core.smtp_syntax).
- Every reply goes through `push`: an enhanced status code is added where missing (RFC 2034)
  and every 5xx counts towards ``limits.maxErrors`` (then ``421 4.7.0`` and close).
- DATA is read in 64 KB chunks up to the end of data (relay.core.smtp_data.DataDecoder), not
  line by line; bytes pipelined after the final dot go back to the command loop.
- One self-re-arming idle timer per session (``limits.idleTimeout``, then ``421 4.4.2``).
- A library exception never reaches the client as itself: it becomes ``451 4.3.0`` and a log
  line; a client that broke off a TLS handshake is logged at info, not as an error.

What it must not do: answer any SMTP command beyond the loop's own refusals (the subclass
does), or decide relay, routing or storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiosmtpd.proxy_protocol import AF, V2_CMD, get_proxy
from aiosmtpd.smtp import SMTP, TLSSetupException

from relay import metrics
from relay.config import ListenerConfig
from relay.core import status
from relay.core.addresses import client_is_trusted
from relay.core.smtp_data import DataDecoder
from relay.core.smtp_syntax import check_command_line
from relay.core.status import Reply, with_enhanced_code
from relay.tls import ServerTls

if TYPE_CHECKING:
    from relay.front import Front

log = logging.getLogger("relay.front")

IDENT = "ESMTP mailrelay"
READ_CHUNK = 64 * 1024  # DATA is read in chunks, not line by line


class _NoHooks:
    """aiosmtpd wants a handler; every command is answered by the session itself."""


def split_command(line: bytes) -> tuple[str, str | None]:
    """A checked command line (CRLF included) as (upper-cased verb, argument or None)."""
    verb, _, argument = line[:-2].partition(b" ")
    try:
        command = verb.upper().decode("ascii")
    except UnicodeDecodeError:
        command = ""
    return command, argument.strip().decode("utf-8", "surrogateescape") or None


class SmtpdSession(SMTP):
    """One SMTP connection's machinery; subclasses add the `smtp_*` command methods."""

    def __init__(self, front: Front, listener: ListenerConfig) -> None:
        self.front = front
        self.listener = listener
        limits = front.config.limits
        # aiosmtpd sizes its StreamReader from this attribute in __init__.
        self.line_length_limit = max(self._max_command_line(), 1024) + 2
        self.client_ip = ""  # the client: the peer, or the one a trusted proxy announced
        self.peer_ip = ""  # the other end of the TCP connection (a proxy, on a PROXY listener)
        self.proxy_unknown = False  # a PROXY header without a client (v2 LOCAL, v1 UNKNOWN)
        self.counted_client: str | None = None  # the key Front.admit_client counted it under
        self._errors = 0
        self._admission: Reply | None = None
        self._registered = False  # holds a slot in front.sessions (from TCP accept to close)
        self._lost = False  # connection_lost ran
        self._tls_up = False  # a TLS handshake completed (connection_made over TLS ran)
        self._handshake: asyncio.Future[None] | None = None  # implicit TLS: before the banner
        self._idle_deadline = 0.0
        self._idle_timer_armed = False
        super().__init__(
            _NoHooks(),
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=front.config.hostname,
            ident=IDENT,
            tls_context=None,  # STARTTLS and implicit TLS are ours (_start_tls)
            require_starttls=False,
            timeout=limits.idle_timeout,
            auth_required=False,
            auth_require_tls=True,
        )

    @property
    def in_transaction(self) -> bool:
        """Whether a drain should let this session finish first (the subclass knows)."""
        return False

    def _max_command_line(self) -> int:
        """The longest command line accepted (``limits.maxCommandLine``; the handoff listener's
        MAIL carries the queue entry)."""
        return self.front.config.limits.max_command_line

    def _data_decoder(self) -> DataDecoder:
        return DataDecoder(self.front.config.limits.max_message_size)

    @property
    def trusted(self) -> bool:
        """Whether the client is in a trusted network (the subclass knows)."""
        return False

    @property
    def secure(self) -> bool:
        return self.listener.tls == "implicit" or self._tls_protocol is not None

    @property
    def authenticated(self) -> bool:
        return bool(self.session is not None and self.session.authenticated)

    def _tag(self) -> str:
        return f"session {self.client_ip}"

    # ------------------------------------------------------------------ the connection and its slot
    # Before TLS the raw transport reports to this object (`connection_lost`); once TLS is
    # layered on (`_start_tls`) it reports to ServerTls, which calls `_raw_connection_lost`
    # even when no handshake completed.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # over TLS, after a completed handshake
            super().connection_made(transport)
            self._tls_up = True
            return
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = self.peer_ip = str(peer[0]) if peer else ""
        proxied = self.listener.proxy_protocol is not None
        # On a PROXY listener the client is known only after the header (_greet): the slot is
        # held from now on, the per-client count waits for the announced address.
        self._admission = self.front.admit(self, count_client=not proxied)
        self._registered = True
        if self.listener.tls == "implicit" and not proxied:
            # At once, before the event loop reads the ClientHello into the plain reader.
            self._handshake = self._start_tls()

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        try:
            super().connection_lost(error)
        finally:
            self._release_slot()

    def _raw_connection_lost(self, error: BaseException | None) -> None:
        """The raw connection under TLS is closed: the slot now; and aiosmtpd's cleanup (idle
        timer, command loop) soon, if the TLS layer does not report it (no handshake). The TLS
        layer schedules its own report first, so this one finds it done."""
        self._release_slot()
        self.loop.call_soon(self.connection_lost, error if isinstance(error, Exception) else None)

    def _release_slot(self) -> None:
        if self._registered:
            self._registered = False
            self.front.release(self)

    def _start_tls(self) -> asyncio.Future[None]:
        """Layer server-side TLS over the raw connection; the future says when the handshake
        is done (an exception if it failed or timed out)."""
        assert self.front.tls is not None  # config validation guarantees it
        raw = self.transport
        if raw is None or raw.is_closing():
            raise ConnectionResetError("connection closed before the TLS handshake")
        waiter: asyncio.Future[None] = self.loop.create_future()
        # Retrieved here too: a connection reset before the command loop ran awaits nothing.
        waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
        tls = ServerTls(
            self.loop,
            self,
            self.front.tls.current(),
            waiter,
            handshake_timeout=self.front.tls_handshake_timeout,
            on_lost=self._raw_connection_lost,
        )
        self._tls_protocol = tls
        self._original_transport = raw
        raw.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(raw)
        # Bytes the plain reader already holds belong to the TLS layer: on a PROXY listener with
        # implicit TLS the ClientHello often arrives in the same segment as the PROXY header.
        # (After STARTTLS these are pipelined plaintext, which aiosmtpd discards on handshake:
        # RFC 3207 4; here only implicit TLS takes them.)
        buffered: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        if buffered and self.listener.tls == "implicit":
            leftover = bytes(buffered)
            buffered.clear()
            asyncio.protocols._feed_data_to_buffered_proto(tls, leftover)  # type: ignore[attr-defined]
        return waiter

    async def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if not self._tls_up:  # the connection closed before the handshake completed
            raise TLSSetupException() from ConnectionResetError("connection lost during the TLS handshake")

    # ------------------------------------------------------------------ the idle timer

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline (every command and DATA chunk calls this). One timer per
        session that re-arms itself when it fires before the deadline, instead of aiosmtpd's
        cancel-and-create per call."""
        if self._lost:
            return
        delay = duration or self._timeout_duration
        self._idle_deadline = self.loop.time() + delay
        if not self._idle_timer_armed or (
            self._timeout_handle is not None and self._timeout_handle.when() > self._idle_deadline
        ):
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timeout_handle = self.loop.call_later(delay, self._idle_check)
            self._idle_timer_armed = True

    def _idle_check(self) -> None:
        remaining = self._idle_deadline - self.loop.time()
        if remaining > 0:
            self._timeout_handle = self.loop.call_later(remaining, self._idle_check)
            return
        self._idle_timer_armed = False
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        log.info("%s: idle timeout", self._tag())
        self.close_with(status.TIMEOUT)

    # ------------------------------------------------------------------ replies

    def close_with(self, reply: Reply) -> None:
        """Send a 421 (or other final reply) and close, from outside the command loop."""
        transport: Any = self.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(Exception):
            transport.write(f"{reply}\r\n".encode())
        transport.close()

    async def push(self, status_line: str | bytes) -> None:
        """Every reply goes through here: an enhanced code is added where missing (RFC 2034)
        and 5xx replies count towards the session's error limit."""
        if isinstance(status_line, bytes):
            status_line = status_line.decode("utf-8", "replace")
        line = with_enhanced_code(status_line)
        if line[:1] == "5":
            self._errors += 1
        await super().push(line)

    async def reply(self, reply: Reply | str) -> None:
        await self.push(str(reply))

    async def _write_raw(self, lines: list[str]) -> None:
        """Replies that carry no enhanced code: the greeting and the EHLO response."""
        self._writer.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))
        await self._writer.drain()

    async def handle_exception(self, error: Exception) -> str:
        log.error("%s: internal error: %r", self._tag(), error, exc_info=error)
        return str(status.INTERNAL_ERROR)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ the command loop

    async def _handle_client(self) -> None:
        if not await self._greet():
            return
        while self.transport is not None:
            try:
                if not await self._one_command():
                    return
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except ConnectionError:
                self._writer.close()
                return
            except TLSSetupException as error:
                # The client broke off the handshake (it did not trust our certificate, spoke
                # no TLS, went away): its problem, not an internal error; no reply can reach it.
                log.info("session %s: TLS handshake failed: %r", self.client_ip, error.__cause__ or error)
                self._close()
                return
            except Exception as error:
                reply = await self.handle_exception(error)
                with contextlib.suppress(Exception):
                    await self.push(reply)

    async def _greet(self) -> bool:
        """The PROXY header, the implicit-TLS handshake, then the banner or the admission
        refusal; False when the session is over."""
        if self.listener.proxy_protocol is not None:
            if self._admission is None and not await self._read_proxy_header():
                return False
            if self._admission is None:
                self._admission = self.front.admit_client(self)
            if self.listener.tls == "implicit" and self._admission is None:
                self._handshake = self._start_tls()
        if self._handshake is not None:
            try:
                await self._handshake_done(self._handshake)
            except TLSSetupException as error:
                log.info("session %s: TLS handshake failed: %r", self.client_ip, error.__cause__ or error)
                self._close()
                return False
        if self._admission is not None:
            log.info("refused connection from %s: %s", self.client_ip, self._admission)
            await self._write_raw([str(self._admission)])
            self._close()
            return False
        if not await self._pregreet():
            return False
        await self._write_raw([f"220 {self.hostname} {IDENT}"])
        return True

    async def _pregreet(self) -> bool:
        """Postscreen's pregreet test on relay listeners (``abuse.pregreetWait``): a client that
        sends anything before the banner is refused ``554 5.5.1``; one that waited passes, and
        is not tested again for ``abuse.pregreetPassFor`` (in the store every worker shares).
        Trusted networks, implicit-TLS listeners (the client speaks first there) and the handoff
        listener skip it."""
        abuse = self.front.config.abuse
        if abuse.pregreet_wait <= 0 or self.listener.mode != "relay" or self.listener.tls == "implicit":
            return True
        handoff = self.front.handoff
        if handoff is not None and self.listener is handoff.config:  # a draining peer, not a client
            return True
        if self.trusted or self.front.abuse.pregreet_passed(self.client_ip):
            return True
        await asyncio.sleep(abuse.pregreet_wait)
        if self.transport is None or self.transport.is_closing():
            return False
        if self._reader._buffer:  # type: ignore[attr-defined]
            log.info("session %s: talked before the greeting, refused", self.client_ip)
            metrics.REJECTED.labels("pregreet").inc()
            await self._write_raw([str(status.PREGREET)])
            self._close()
            return False
        if self._reader.at_eof():
            self._close()
            return False
        self.front.abuse.pregreet_pass(self.client_ip, abuse)
        return True

    async def _read_proxy_header(self) -> bool:
        """Read the PROXY header (aiosmtpd's parser) from a trusted proxy and take the client
        address it announces; False (connection dropped, logged and counted) otherwise."""
        proxy = self.listener.proxy_protocol
        assert proxy is not None
        if not client_is_trusted(self.peer_ip, proxy.trusted_from):
            return self._drop_proxy("untrusted_source", "not in proxyProtocol.trustedFrom")
        try:
            data = await asyncio.wait_for(get_proxy(self._reader), proxy.timeout)
        except TimeoutError:
            return self._drop_proxy("timeout", f"no PROXY header within {proxy.timeout:g}s")
        except (asyncio.IncompleteReadError, ConnectionError):
            return self._drop_proxy("missing", "connection closed before a PROXY header")
        if not data.valid:
            reason = "missing" if data.version is None else "invalid"
            return self._drop_proxy(reason, f"bad PROXY header: {data.error or 'incomplete'}")
        if proxy.version != "any" and data.version != int(proxy.version[1]):
            return self._drop_proxy("version", f"PROXY v{data.version}, the listener takes {proxy.version}")
        local = data.version == 2 and data.command == V2_CMD.LOCAL
        if local or data.family not in (AF.INET, AF.INET6) or data.src_addr is None:
            # The proxy's own connection (a health check): no client to announce. The session
            # keeps the proxy's address and is never trusted (relay.front_session.trusted).
            self.proxy_unknown = True
            log.info("session %s: PROXY header without a client address (%s)", self.peer_ip, data.family)
            return True
        self.client_ip = str(data.src_addr)
        log.info("session %s: PROXY v%d from %s", self.client_ip, data.version, self.peer_ip)
        return True

    def _drop_proxy(self, reason: str, text: str) -> bool:
        log.warning("connection from %s dropped (listener %s): %s", self.peer_ip, self.listener.name, text)
        metrics.PROXY_DROPPED.labels(self.listener.name, reason).inc()
        self._close()
        return False

    async def _next_line(self) -> bytes | None:
        """The next command line, CRLF included; None when it was too long (skipped and
        answered). IncompleteReadError when the client went away."""
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as error:
            await self._reader.read(error.consumed)
            while True:
                try:
                    await self._reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as again:
                    await self._reader.read(again.consumed)
            await self.reply(status.LINE_TOO_LONG)
            return None

    async def _one_command(self) -> bool:
        """Read and answer one command line; False when the session is over."""
        try:
            line = await self._next_line()
        except asyncio.IncompleteReadError:
            self._close()
            return False
        if line is None:
            return await self._check_errors()
        problem = check_command_line(line, self._max_command_line() + 2)
        if problem is None and len(line) == 2:
            problem = status.BAD_SYNTAX
        if problem is not None:
            await self.reply(problem)
            if not line.endswith(b"\r\n"):
                log.info("session %s: bare LF in command, closing", self.client_ip)
                self._close()
                return False
            return await self._check_errors()
        command, argument = split_command(line)
        method = self._smtp_methods.get(command) if command.isalpha() else None
        if method is None:
            await self.reply(status.UNKNOWN_COMMAND)
            return await self._check_errors()
        self._reset_timeout()
        await method(argument)
        if not await self._check_errors():
            return False
        if self.front.draining and not self.in_transaction and self.transport is not None:
            await self.reply(status.SHUTTING_DOWN)
            self._close()
            return False
        return True

    async def _read_data(self) -> DataDecoder | None:
        """After the 354: read the message in chunks until ``<CRLF>.<CRLF>``; pipelined
        bytes after the end go back to the reader for the command loop. None when the client
        went away."""
        decoder = self._data_decoder()
        reader = self._reader
        while True:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                self._close()
                return None
            self._reset_timeout()
            used = decoder.feed(chunk)
            if used >= 0:
                rest = chunk[used:]
                if rest:
                    # StreamReader has no unread(); its buffer is a bytearray (asyncio internals).
                    reader._buffer[0:0] = rest  # type: ignore[attr-defined]
                return decoder

    async def _check_errors(self) -> bool:
        """False (and the session closed with 421) once the client made too many errors."""
        if self._errors >= self.front.config.limits.max_errors and self.transport is not None:
            log.info("%s: too many errors (%d), closing", self._tag(), self._errors)
            metrics.REJECTED.labels("errors").inc()
            await self.reply(status.TOO_MANY_ERRORS)
            self._close()
            return False
        return self.transport is not None
