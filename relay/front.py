"""The SMTP front (Postfix's smtpd + cleanup): accepts mail on the configured listeners and
answers ``250`` only once the message is durable in the spool.

Built on aiosmtpd 1.4.6's `SMTP` protocol class, which keeps the socket, stream and timer
machinery. Layering TLS (STARTTLS and implicit TLS alike) is ours: a session's slot (counted
against ``limits.maxConnections``/``maxConnectionsPerClient`` and the sessions gauge) is held
from the TCP accept until that connection closes, whether or not a handshake ever completed.
The command loop and every command the relay answers are ours too, because aiosmtpd
lets through what a relay must refuse (NOTES.md): bare LF line ends, NUL and control characters
in addresses, ``RCPT TO:<>``, unlimited recipients and hops, open relaying, and DATA read line by
line. The decisions themselves live in pure modules: `relay.core.smtp_syntax` (command syntax and
parameters), `relay.core.smtp_data` (end of data, dot-unstuffing, normalisation, limits),
`relay.core.addresses` (relay permission), `relay.core.routing.select_route` (RejectHop at RCPT),
`relay.core.received` (trace header, hop count, submission headers), `relay.core.status` (replies).

Who calls it: relay.app creates one `Front` per process, `await front.start()`, swaps the
configuration on reload with `update_config`, and on SIGTERM calls `await front.drain(grace)`.

Choices worth knowing: a command line ended by a bare LF is refused with ``501 5.5.2`` and the
connection closed (where the next command starts is ambiguous); a bare CR inside a CRLF line
is refused with ``501 5.5.2`` and the session goes on. Bare CR/LF in message content is
normalised to CRLF and NUL refuses the message (see relay.core.smtp_data). Every 5xx reply counts
towards ``limits.maxErrors`` (then ``421 4.7.0`` and close); ``452 4.5.3`` does not. Connection
limits are per process (with N workers the totals are N times larger) and count a connection
from its TCP accept, also while its TLS handshake is pending; a handshake (after STARTTLS or on
an implicit-TLS listener) must complete within 30 s (`Front.tls_handshake_timeout`). Recipients that match
no route are refused at RCPT with ``550 5.4.4``; a RejectHop route answers with its own reply.
``RCPT TO:<postmaster>`` without a domain is accepted from anyone (RFC 5321 4.5.1) as
``postmaster@`` the first plain accept domain (else the hostname) and routed like that address.

After storing, the front may hold its 250 for up to a second while new mail waits for delivery
slots (the scheduler's ``room_for_intake``, Postfix's in_flow_delay), so clients send no
faster than the relay delivers.

What it must not do: decide delivery (the scheduler does), answer 250 before
``await spool.store`` returned, or let a library exception escape to the client (it becomes
``451 4.3.0`` and a log line).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import socket
import ssl
import time
from asyncio import sslproto
from base64 import b64decode
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiosmtpd.smtp import SMTP, TLSSetupException

from relay import metrics
from relay.config import ListenerConfig, RejectHop, RelayConfig, RouteConfig, TlsConfig
from relay.core import status
from relay.core.addresses import (
    RelayDecision,
    client_is_trusted,
    domain_of,
    postmaster_address,
    relay_permission,
)
from relay.core.model import Envelope, QueueEntry, Recipient
from relay.core.received import TraceInfo, build_received, count_received, protocol_name, submission_headers
from relay.core.routing import select_route
from relay.core.smtp_data import DataDecoder
from relay.core.smtp_syntax import (
    CommandError,
    MailParams,
    ParsedPath,
    check_command_line,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
    valid_helo,
)
from relay.core.status import Reply, reject_reply, with_enhanced_code
from relay.spool import Spool, SpoolError, SpoolFullError, new_queue_id
from relay.users import UserDatabase

log = logging.getLogger(__name__)


def routed_text(path_argument: str | None) -> bool:
    """Whether a raw RCPT argument carries source-routing characters (several ``@``, ``%``, ``!``)."""
    text = path_argument or ""
    return text.count("@") > 1 or "%" in text or "!" in text


READ_CHUNK = 64 * 1024
IDENT = "ESMTP mailrelay"


# ----------------------------------------------------------------------------- TLS


class TlsContexts:
    """The server TLS context from the certificate files, rebuilt when the files change (a
    renewed cert-manager Secret): every handshake (STARTTLS or implicit TLS) takes `current()`
    when it starts."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._stamp: tuple[float, float] | None = None
        self._checked = 0.0
        self._context = self._build()

    def _files_stamp(self) -> tuple[float, float]:
        return (os.stat(self.tls.cert_file).st_mtime, os.stat(self.tls.key_file).st_mtime)

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        self._stamp = self._files_stamp()
        return context

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                if self._files_stamp() != self._stamp:
                    self._context = self._build()
                    log.info("TLS certificate reloaded from %s", self.tls.cert_file)
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS certificate reload failed, keeping the old one: %s", exc)
        return self._context


# ----------------------------------------------------------------------------- the front


@dataclass
class _ListenerRuntime:
    config: ListenerConfig
    server: asyncio.AbstractServer | None = None
    address: tuple[str, int] = ("", 0)


@dataclass
class FrontStats:
    sessions: int = 0
    accepted: int = 0
    per_client: collections.Counter[str] = field(default_factory=collections.Counter)


class Front:
    """The SMTP front of one relay process: listeners, shared limits, live configuration."""

    def __init__(
        self,
        config: RelayConfig,
        spool: Spool,
        *,
        on_stored: Callable[[str], None] | None = None,
        intake_gate: Callable[[], Awaitable[object]] | None = None,
        users: UserDatabase | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.routes: list[RouteConfig] = config.ordered_routes()
        self.spool = spool
        self.on_stored = on_stored
        self.intake_gate = intake_gate
        self.clock = clock
        self.users = users
        if users is None and config.auth is not None:
            self.users = UserDatabase.load(config.auth.users_file)
        self.tls = TlsContexts(config.tls) if config.tls is not None else None
        self.listeners = {lc.name: _ListenerRuntime(lc) for lc in config.listeners}
        self.sessions: set[FrontSession] = set()
        self.stats = FrontStats()
        self.draining = False
        self.auth_failure_delay = 0.5  # seconds, times the session's failure count (capped)
        self.tls_handshake_timeout = 30.0  # seconds, STARTTLS and implicit TLS alike
        self._idle = asyncio.Event()
        self._idle.set()
        if any(p == "*" for p in config.accept_domains):
            log.warning("acceptDomains contains '*': ignored, it would make an open relay")

    # ------------------------------------------------------------------ lifecycle

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Bound (host, port) per listener name (useful with port 0)."""
        return {name: rt.address for name, rt in self.listeners.items()}

    async def start(self) -> None:
        """Bind every listener (SO_REUSEPORT, so worker processes share the port) and serve."""
        loop = asyncio.get_running_loop()
        for runtime in self.listeners.values():
            listener = runtime.config
            sock = bind_socket(listener.host, listener.port)
            # No ssl= here, also for implicit TLS: the session layers TLS over the raw
            # connection itself (FrontSession._start_tls), so its slot is held from the TCP
            # accept and given back when that connection closes, handshake or not.
            runtime.server = await loop.create_server(
                functools.partial(FrontSession, self, listener), sock=sock
            )
            runtime.address = sock.getsockname()[:2]
            log.info(
                "listener %s (%s, tls %s, auth %s) on %s:%d",
                listener.name,
                listener.mode,
                listener.tls,
                listener.auth,
                *runtime.address,
            )

    def update_config(self, config: RelayConfig) -> None:
        """Swap routes, limits, networks and domains for new commands; sessions stay open.
        Listener, TLS and auth-file changes need a restart (logged)."""
        if [lc.model_dump() for lc in config.listeners] != [lc.model_dump() for lc in self.config.listeners]:
            log.warning("listener changes in the new configuration take effect after a restart")
        if config.tls != self.config.tls or config.auth != self.config.auth:
            log.warning("tls/auth file changes in the new configuration take effect after a restart")
        if any(p == "*" for p in config.accept_domains):
            log.warning("acceptDomains contains '*': ignored, it would make an open relay")
        self.config = config
        self.routes = config.ordered_routes()

    async def drain(self, grace: float) -> None:
        """Stop accepting: new sessions get 421 4.3.2, idle sessions are closed with 421 4.3.2,
        transactions in flight may finish within `grace` seconds; then everything is closed."""
        self.draining = True
        for session in list(self.sessions):
            if not session.in_transaction:
                session.close_with(status.SHUTTING_DOWN)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        for session in list(self.sessions):
            session.close_with(status.SHUTTING_DOWN)
        await self.close()

    async def close(self) -> None:
        for runtime in self.listeners.values():
            if runtime.server is not None:
                runtime.server.close()
        for session in list(self.sessions):
            session.close_with(status.SHUTTING_DOWN)
        for runtime in self.listeners.values():
            if runtime.server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(runtime.server.wait_closed(), timeout=5)

    # ------------------------------------------------------------------ sessions

    def admit(self, session: FrontSession) -> Reply | None:
        """Register a new connection; the reply to send instead of the banner, if refused."""
        self.sessions.add(session)
        self._idle.clear()
        self.stats.sessions += 1
        self.stats.per_client[session.client_ip] += 1
        metrics.SESSIONS.labels(session.listener.name).inc()
        limits = self.config.limits
        if self.draining:
            return status.SHUTTING_DOWN
        if len(self.sessions) > limits.max_connections:
            metrics.REJECTED.labels("connections").inc()
            return status.TOO_MANY_CONNECTIONS
        if self.stats.per_client[session.client_ip] > limits.max_connections_per_client:
            metrics.REJECTED.labels("connections").inc()
            return status.TOO_MANY_CONNECTIONS_FROM_YOU
        return None

    def release(self, session: FrontSession) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self.stats.sessions -= 1
        self.stats.per_client[session.client_ip] -= 1
        if self.stats.per_client[session.client_ip] <= 0:
            del self.stats.per_client[session.client_ip]
        metrics.SESSIONS.labels(session.listener.name).dec()
        if not self.sessions:
            self._idle.set()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEADDR and SO_REUSEPORT (shared by worker processes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------------------------- one session


class _NoHooks:
    """aiosmtpd wants a handler; every command is answered by FrontSession itself."""


class _SessionTls(sslproto.SSLProtocol):
    """asyncio's server-side TLS layer over a session's raw connection, which tells the session
    when that connection is gone, whether or not the handshake completed. (The plain
    SSLProtocol tells its application protocol only about connections it announced, that is
    after a completed handshake: a client that sent STARTTLS and then closed, sent garbage or
    timed out used to keep its session slot for ever.)"""

    def __init__(self, session: FrontSession, context: ssl.SSLContext, waiter: asyncio.Future[None]) -> None:
        super().__init__(
            session.loop,
            session,
            context,
            waiter,
            server_side=True,
            # typeshed says int; asyncio takes any number of seconds
            ssl_handshake_timeout=session.front.tls_handshake_timeout,  # type: ignore[arg-type]
        )
        self._session = session

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._session._raw_connection_lost(exc)


class FrontSession(SMTP):
    """One SMTP connection. Commands are answered in the order they arrive (pipelining)."""

    def __init__(self, front: Front, listener: ListenerConfig) -> None:
        self.front = front
        self.listener = listener
        limits = front.config.limits
        # aiosmtpd sizes its StreamReader from this attribute in __init__.
        self.line_length_limit = max(limits.max_command_line, 1024) + 2
        self.client_ip = ""
        self.in_data = False
        self._errors = 0
        self._auth_failures = 0
        self._admission: Reply | None = None
        self._registered = False  # holds a slot in front.sessions (from TCP accept to close)
        self._lost = False  # connection_lost ran
        self._tls_up = False  # a TLS handshake completed (connection_made over TLS ran)
        self._handshake: asyncio.Future[None] | None = None
        self._trust: tuple[object, str, bool] | None = None  # (networks, client address, trusted)
        self._idle_deadline = 0.0
        self._idle_timer_armed = False
        self._reset_transaction()
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

    # ------------------------------------------------------------------ state

    def _reset_transaction(self) -> None:
        self._queue_id = ""
        self._mail: ParsedPath | None = None
        self._mail_params: MailParams | None = None
        self._rcpts: list[Recipient] = []
        self._rcpt_seen: set[str] = set()

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self._reset_transaction()

    @property
    def in_transaction(self) -> bool:
        return self._mail is not None or self.in_data

    @property
    def secure(self) -> bool:
        return self.listener.tls == "implicit" or self._tls_protocol is not None

    @property
    def authenticated(self) -> bool:
        return bool(self.session is not None and self.session.authenticated)

    @property
    def trusted(self) -> bool:
        networks, client_ip = self.front.config.trusted_networks, self.client_ip
        trust = self._trust
        if trust is None or trust[0] is not networks or trust[1] != client_ip:  # once per session
            trust = self._trust = (networks, client_ip, client_is_trusted(client_ip, networks))
        return trust[2]

    def _tag(self) -> str:
        return self._queue_id or f"session {self.client_ip}"

    # ------------------------------------------------------------------ connection

    # The session slot: taken when the TCP connection is accepted (`connection_made` on the
    # raw transport), given back once when that connection is closed, however the session
    # ends. Before TLS the raw transport reports to this object (`connection_lost`); once TLS
    # is layered on (`_start_tls`) it reports to `_SessionTls`, which calls
    # `_raw_connection_lost` even when no handshake completed.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # over TLS, after a completed handshake
            super().connection_made(transport)
            self._tls_up = True
            return
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else ""
        self._admission = self.front.admit(self)
        self._registered = True
        if self.listener.tls == "implicit":
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
        is done (TLSSetupException if it failed, timed out or the connection went away)."""
        assert self.front.tls is not None  # config validation guarantees it
        raw = self.transport
        if raw is None or raw.is_closing():
            raise ConnectionResetError("connection closed before the TLS handshake")
        waiter: asyncio.Future[None] = self.loop.create_future()
        # Retrieved here too: a connection reset before the command loop ran awaits nothing.
        waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
        tls = _SessionTls(self, self.front.tls.current(), waiter)
        self._tls_protocol = tls
        self._original_transport = raw
        raw.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(raw)
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

    # ------------------------------------------------------------------ the command loop

    async def _handle_client(self) -> None:
        if self._handshake is not None:  # implicit TLS: the handshake comes before the banner
            try:
                await self._handshake_done(self._handshake)
            except TLSSetupException as error:
                log.info("session %s: TLS handshake failed: %r", self.client_ip, error.__cause__ or error)
                self._close()
                return
        if self._admission is not None:
            log.info("refused connection from %s: %s", self.client_ip, self._admission)
            await self._write_raw([str(self._admission)])
            self._close()
            return
        await self._write_raw([f"220 {self.hostname} {IDENT}"])
        while self.transport is not None:
            try:
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as error:
                    await self._reader.read(error.consumed)
                    while True:
                        try:
                            await self._reader.readuntil(b"\n")
                            break
                        except asyncio.LimitOverrunError as again:
                            await self._reader.read(again.consumed)
                    await self.reply(status.LINE_TOO_LONG)
                    if not await self._check_errors():
                        return
                    continue
                except asyncio.IncompleteReadError:
                    self._close()
                    return
                problem = check_command_line(line, self.front.config.limits.max_command_line + 2)
                if problem is None and len(line) == 2:
                    problem = status.BAD_SYNTAX
                if problem is not None:
                    await self.reply(problem)
                    if not line.endswith(b"\r\n"):
                        # A line ended by a bare LF: where the client thinks the next command
                        # starts is ambiguous, so nothing after it is trusted (Postfix's
                        # smtpd_forbid_bare_newline=reject also disconnects).
                        log.info("session %s: bare LF in command, closing", self.client_ip)
                        self._close()
                        return
                    if not await self._check_errors():
                        return
                    continue
                command_bytes, _, arg_bytes = line[:-2].partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    command = ""
                arg = arg_bytes.strip().decode("utf-8", "surrogateescape") or None
                method = self._smtp_methods.get(command) if command.isalpha() else None
                if method is None:
                    await self.reply(status.UNKNOWN_COMMAND)
                    if not await self._check_errors():
                        return
                    continue
                self._reset_timeout()
                await method(arg)
                if not await self._check_errors():
                    return
                if self.front.draining and not self.in_transaction and self.transport is not None:
                    await self.reply(status.SHUTTING_DOWN)
                    self._close()
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

    async def _check_errors(self) -> bool:
        """False (and the session closed with 421) once the client made too many errors."""
        if self._errors >= self.front.config.limits.max_errors and self.transport is not None:
            log.info("%s: too many errors (%d), closing", self._tag(), self._errors)
            metrics.REJECTED.labels("errors").inc()
            await self.reply(status.TOO_MANY_ERRORS)
            self._close()
            return False
        return self.transport is not None

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ greeting commands

    async def smtp_HELO(self, arg: str | None) -> None:
        if not arg or not valid_helo(arg):
            await self.reply(status.BAD_ARGUMENTS.with_text("Syntax: HELO hostname"))
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = arg
        await self.reply(f"250 {self.hostname}")

    async def smtp_EHLO(self, arg: str | None) -> None:
        if not arg or not valid_helo(arg):
            await self.reply(status.BAD_ARGUMENTS.with_text("Syntax: EHLO hostname"))
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = arg
        limits = self.front.config.limits
        keywords = [
            f"SIZE {limits.max_message_size}",
            "8BITMIME",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
        ]
        if self.listener.tls == "starttls" and not self.secure and self.front.tls is not None:
            keywords.append("STARTTLS")
        if self._auth_offered():
            keywords.append("AUTH PLAIN LOGIN")
        keywords.append("HELP")
        lines = [f"250-{self.hostname}"] + [f"250-{k}" for k in keywords[:-1]] + [f"250 {keywords[-1]}"]
        await self._write_raw(lines)

    def _auth_offered(self) -> bool:
        return self.listener.auth != "none" and self.front.users is not None and self.secure

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.reply(status.OK)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.reply(status.BAD_ARGUMENTS.with_text("Syntax: RSET"))
            return
        self._set_rset_state()
        await self.reply(status.OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self.reply(status.BYE)
        self._close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.reply(status.VRFY_CANNOT)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.reply(status.NOT_IMPLEMENTED)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.reply("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH")

    # ------------------------------------------------------------------ TLS and AUTH

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.reply(status.BAD_ARGUMENTS.with_text("Syntax: STARTTLS"))
            return
        if self.listener.tls != "starttls" or self.front.tls is None:
            await self.reply(status.NOT_IMPLEMENTED)
            return
        if self.secure:
            await self.reply(status.TLS_ALREADY)
            return
        await self.push("220 Ready to start TLS")
        await self._handshake_done(self._start_tls())
        self._reset_transaction()

    async def smtp_AUTH(self, arg: str | None) -> None:
        assert self.session is not None
        if self.listener.auth == "none" or self.front.users is None:
            await self.reply(status.AUTH_NOT_AVAILABLE)
            return
        if not self.session.host_name or not self.session.extended_smtp:
            await self.reply(status.NEED_HELO.with_text("Send EHLO first"))
            return
        if not self.secure:
            await self.reply(status.TLS_REQUIRED_FOR_AUTH)
            return
        if self.session.authenticated:
            await self.reply(status.AUTH_ALREADY)
            return
        if self._mail is not None:
            await self.reply(status.AUTH_IN_TRANSACTION)
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.reply(status.BAD_ARGUMENTS.with_text("Syntax: AUTH mechanism [initial-response]"))
            return
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            credentials = await self._auth_plain(args)
        elif mechanism == "LOGIN":
            credentials = await self._auth_login(args)
        else:
            await self.reply(status.AUTH_MECHANISM)
            return
        if credentials is None:
            return  # the exchange was aborted or malformed; already answered
        user, password = credentials
        self.front.users.refresh()
        ok = await asyncio.to_thread(self.front.users.verify, user, password)
        if ok:
            self.session.authenticated = True
            self.session.auth_data = user  # type: ignore[assignment]
            log.info("session %s: authenticated as %s", self.client_ip, user)
            await self.reply(status.AUTH_OK)
            return
        self._auth_failures += 1
        metrics.REJECTED.labels("auth").inc()
        log.info("session %s: authentication failed for %r (%d)", self.client_ip, user, self._auth_failures)
        await asyncio.sleep(min(self.front.auth_failure_delay * self._auth_failures, 5.0))
        auth = self.front.config.auth
        if auth is not None and self._auth_failures >= auth.max_failures:
            await self.reply(status.TOO_MANY_AUTH_FAILURES)
            self._close()
            return
        await self.reply(status.AUTH_FAILED)

    async def _auth_response(self, challenge: str, given: str | None) -> bytes | None:
        """Decode a base64 response: the initial one or the answer to a 334 challenge."""
        if given is None:
            answer = await self.challenge_auth(challenge)
            if not isinstance(answer, bytes):
                return None  # aborted with "*" or bad base64: challenge_auth replied
            return answer
        if given == "=":
            return b""
        try:
            return b64decode(given.encode("ascii", "replace"), validate=True)
        except ValueError:
            await self.reply(status.AUTH_BAD_BASE64)
            return None

    async def _auth_plain(self, args: list[str]) -> tuple[str, str] | None:
        blob = await self._auth_response("", args[1] if len(args) > 1 else None)
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.reply(status.AUTH_BAD_BASE64.with_text("Malformed PLAIN response (RFC 4616)"))
            return None
        _authzid, login, password = parts
        return login.decode("utf-8", "replace"), password.decode("utf-8", "surrogateescape")

    async def _auth_login(self, args: list[str]) -> tuple[str, str] | None:
        login = await self._auth_response("Username:", args[1] if len(args) > 1 else None)
        if login is None:
            return None
        password = await self._auth_response("Password:", None)
        if password is None:
            return None
        return login.decode("utf-8", "replace"), password.decode("utf-8", "surrogateescape")

    # ------------------------------------------------------------------ the transaction

    def _auth_needed(self) -> bool:
        if self.authenticated:
            return False
        if self.listener.auth == "required":
            return True
        return self.listener.mode == "submission" and not self.trusted

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self.reply(status.NEED_HELO)
            return
        if self.front.draining:
            await self.reply(status.SHUTTING_DOWN)
            self._close()
            return
        if self._auth_needed():
            metrics.REJECTED.labels("auth_required").inc()
            await self.reply(status.AUTH_REQUIRED)
            return
        if self._mail is not None:
            await self.reply(status.NESTED_MAIL)
            return
        try:
            path = parse_path(arg, "FROM:", utf8=True, null_allowed=True)
            if path.params and not self.session.extended_smtp:
                raise CommandError(status.BAD_ARGUMENTS, "parameters need EHLO")
            params = parse_mail_params(path.params, self.front.config.limits.max_message_size)
            if not params.smtputf8 and not path.address.isascii():
                raise CommandError(status.NO_SMTPUTF8)
        except CommandError as exc:
            reason = "size" if exc.reply is status.SIZE_EXCEEDED else "syntax"
            metrics.REJECTED.labels(reason).inc()
            log.info("session %s: MAIL refused: %s (%s)", self.client_ip, exc.reply, exc)
            await self.reply(exc.reply)
            return
        self._mail = path
        self._mail_params = params
        self._queue_id = new_queue_id()
        log.info("%s: client=[%s] from=<%s>", self._queue_id, self.client_ip, path.address)
        await self.reply(status.SENDER_OK)

    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self.reply(status.NEED_HELO)
            return
        if self._mail is None or self._mail_params is None:
            await self.reply(status.NEED_MAIL)
            return
        try:
            path = parse_path(arg, "TO:", utf8=self._mail_params.smtputf8, null_allowed=False)
            if path.params and not self.session.extended_smtp:
                raise CommandError(status.BAD_ARGUMENTS, "parameters need EHLO")
            params = parse_rcpt_params(path.params)
        except CommandError as exc:
            reply = exc.reply
            may_relay = self.trusted or self.authenticated
            if reply == status.BAD_RECIPIENT and not may_relay and routed_text(arg):
                # Not an address, and it carries routing characters: an open-relay probe from a
                # client that may not relay, refused as one (5.7.1), not as a typo (5.1.3).
                reply = status.ROUTING_CHARACTERS
            metrics.REJECTED.labels("syntax").inc()
            log.info("%s: RCPT refused: %s (%s)", self._queue_id, reply, exc)
            await self.reply(reply)
            return
        config = self.front.config
        bare_postmaster = not path.domain
        if bare_postmaster:  # RFC 5321 4.5.1: <postmaster> MUST be accepted, from anyone
            address = postmaster_address(config.hostname, config.accept_domains)
            path = dataclasses.replace(path, address=address, local="postmaster", domain=domain_of(address))
        if path.address in self._rcpt_seen:
            await self.reply(status.RECIPIENT_OK)  # a duplicate is delivered once
            return
        if len(self._rcpts) >= config.limits.max_recipients:
            metrics.REJECTED.labels("recipients").inc()
            await self.reply(status.TOO_MANY_RECIPIENTS)
            return
        decision = (
            RelayDecision(True, "postmaster")
            if bare_postmaster
            else relay_permission(
                path.local,
                path.domain,
                trusted=self.trusted,
                authenticated=self.authenticated,
                accept_domains=config.accept_domains,
            )
        )
        if not decision.allowed:
            metrics.REJECTED.labels(decision.reason).inc()
            log.info("%s: to=<%s> refused: %s", self._queue_id, path.address, decision.reason)
            reply = (
                status.ROUTING_CHARACTERS if decision.reason == "routing_characters" else status.RELAY_DENIED
            )
            await self.reply(reply)
            return
        route = select_route(self.front.routes, self._mail.address, path.address)
        if route is None:
            metrics.REJECTED.labels("no_route").inc()
            log.info("%s: to=<%s> refused: no route", self._queue_id, path.address)
            await self.reply(status.NO_ROUTE)
            return
        if isinstance(route.next_hop, RejectHop):
            metrics.REJECTED.labels("route_reject").inc()
            log.info("%s: to=<%s> refused by route %s", self._queue_id, path.address, route.name)
            await self.reply(reject_reply(route.next_hop.code, route.next_hop.message))
            return
        self._rcpts.append(Recipient(address=path.address, notify=params.notify, orcpt=params.orcpt))
        self._rcpt_seen.add(path.address)
        await self.reply(status.RECIPIENT_OK)

    async def smtp_DATA(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self.reply(status.NEED_HELO)
            return
        if self._mail is None:
            await self.reply(status.NEED_MAIL)
            return
        if not self._rcpts:
            await self.reply(status.NEED_RCPT)
            return
        if arg:
            await self.reply(status.BAD_ARGUMENTS.with_text("Syntax: DATA"))
            return
        self.in_data = True
        try:
            await self._write_raw([status.START_DATA])
            decoder = await self._read_data()
            if decoder is None:
                return  # connection gone
            reply = await self._accept(decoder)
        finally:
            self.in_data = False
            self._set_rset_state()
        await self.reply(reply)

    async def _read_data(self) -> DataDecoder | None:
        """Read the message in chunks until ``<CRLF>.<CRLF>``; pipelined bytes after the end
        go back to the reader for the command loop. None when the client went away."""
        decoder = DataDecoder(self.front.config.limits.max_message_size)
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

    async def _accept(self, decoder: DataDecoder) -> Reply | str:
        """Judge the received message, store it durably and say what to answer."""
        assert self._mail is not None and self._mail_params is not None and self.session is not None
        queue_id = self._queue_id
        config = self.front.config
        if decoder.problem is not None:
            reason = "size" if decoder.problem is status.SIZE_EXCEEDED else "content"
            metrics.REJECTED.labels(reason).inc()
            log.info("%s: message refused: %s", queue_id, decoder.problem)
            return decoder.problem
        content = decoder.content()
        hops = count_received(content)
        hops_limit = config.limits.max_hops
        if hops >= hops_limit:
            metrics.REJECTED.labels("loop").inc()
            log.info(
                "%s: message refused: %d Received headers (limit %d)", queue_id, hops, config.limits.max_hops
            )
            return status.TOO_MANY_HOPS
        now = self.front.clock()
        when = datetime.fromtimestamp(now, tz=UTC).astimezone()
        recipients = tuple(self._rcpts)
        trace = TraceInfo(
            helo=self.session.host_name or "",
            client_ip=self.client_ip,
            hostname=config.hostname,
            protocol=protocol_name(
                esmtp=self.session.extended_smtp,
                tls=self.secure,
                authenticated=self.authenticated,
                smtputf8=self._mail_params.smtputf8,
            ),
            queue_id=queue_id,
            recipients=tuple(r.address for r in recipients),
            when=when,
            tls=self._tls_description(),
        )
        head = build_received(trace)
        if self.listener.mode == "submission":
            head += submission_headers(
                content, when=when, queue_id=queue_id, hostname=config.hostname, token=secrets.token_hex(4)
            )
        params = self._mail_params
        entry = QueueEntry(
            queue_id=queue_id,
            envelope=Envelope(
                mail_from=self._mail.address,
                recipients=recipients,
                body=params.body,
                smtputf8=params.smtputf8,
                ret=params.ret,
                envid=params.envid,
            ),
            arrival=now,
            pending=recipients,
            client_address=self.client_ip,
            helo=self.session.host_name or "",
        )
        try:
            await self.front.spool.store(entry, head + content)
        except SpoolFullError as exc:
            metrics.REJECTED.labels("spool_full").inc()
            log.error("%s: not stored, spool full: %s", queue_id, exc)
            return status.SPOOL_FULL
        except SpoolError as exc:
            metrics.REJECTED.labels("spool_error").inc()
            log.error("%s: not stored: %s", queue_id, exc)
            return status.SPOOL_ERROR
        except Exception as exc:
            metrics.REJECTED.labels("spool_error").inc()
            log.exception("%s: not stored: %r", queue_id, exc)
            return status.SPOOL_ERROR
        self.front.stats.accepted += 1
        metrics.ACCEPTED.labels(self.listener.name).inc()
        log.info(
            "%s: accepted size=%d nrcpt=%d from=<%s>%s",
            queue_id,
            len(content),
            len(recipients),
            self._mail.address,
            " (bare line ends normalised)" if decoder.normalized else "",
        )
        if self.front.on_stored is not None:
            try:
                self.front.on_stored(queue_id)
            except Exception:  # the message is safe on disk; the scheduler's rescan finds it
                log.exception("%s: scheduler notification failed", queue_id)
        if self.front.intake_gate is not None:
            await self.front.intake_gate()  # in-flow control: at most a second, mail is safe
        return status.QUEUED.with_text(f"Ok: queued as {queue_id}")

    def _tls_description(self) -> str | None:
        if not self.secure or self.transport is None:
            return None
        ssl_object: Any = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        if not cipher:
            return str(ssl_object.version())
        name, _proto, bits = cipher
        return f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"
