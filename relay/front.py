"""The SMTP front (Postfix's smtpd + cleanup): accepts mail on the configured listeners and
answers ``250`` only once the message is durable in the spool.

This module is the front of one process: its listeners (SO_REUSEPORT, so worker processes
share a port), the limits shared by its sessions and the live configuration. A session is
relay.front_session.FrontSession (the commands) on relay.smtpd.SmtpdSession (aiosmtpd 1.4.6's
`SMTP` class kept for the socket, streams and timers; the command loop, replies, TLS layering
and the session slot overridden), with TLS contexts from relay.tls. aiosmtpd lets through what
a relay must refuse (bench/RESULTS.md, docs/RELAY-CORE.md): bare LF line ends, NUL and control
characters in addresses, ``RCPT TO:<>``, unlimited recipients and hops, open relaying, and DATA
read line by line. The decisions live in pure modules: `relay.core.smtp_syntax` (command syntax
and parameters), `relay.core.sasl` (AUTH PLAIN/LOGIN), `relay.core.rcpt` (each recipient:
relay permission from `relay.core.addresses`, postmaster, recipient limit, route and RejectHop
from `relay.core.routing`), `relay.core.smtp_data` (end of data, dot-unstuffing,
normalisation, limits), `relay.core.accept` (refusals after DATA, trace and queue entry, with
`relay.core.received`), `relay.core.status` (replies).

Who calls it: relay.app creates one `Front` per process, `await front.start()`, swaps the
configuration on reload with `update_config`, and on SIGTERM calls `await front.drain(grace)`.

Choices worth knowing: a session holds a slot from its TCP accept until that connection closes
(also while a TLS handshake is pending, and however it ends): ``limits.maxConnections`` and
``maxConnectionsPerClient`` count slots (``421 4.7.0`` beyond), the first per process (with N
workers the total is N times larger), ``maxConnectionsPerClient`` over all workers (relay.abuse, the
store they share, which also holds AUTH-failure blocks and rate counts: relay.core.abuse); the
``mailrelay_smtp_sessions`` gauge shows them. A TLS
handshake (after STARTTLS or on an implicit-TLS listener) must complete within 30 s
(`tls_handshake_timeout`). During a drain new sessions get ``421 4.3.2`` instead of the banner,
idle ones are closed with it, transactions in flight may finish within the grace. The command
loop's rules (bare LF, errors, idle timeout) are in relay.smtpd, the commands' in
relay.front_session, each refusal's reply in the pure modules above.

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
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay import logs, metrics
from relay.abuse import AbuseStore
from relay.config import ListenerConfig, RelayConfig, RouteConfig
from relay.core import status
from relay.core.accept import Prepared
from relay.core.addresses import client_is_trusted
from relay.core.status import Reply
from relay.front_session import FrontSession
from relay.handoff_server import HandoffSession, handoff_listener
from relay.recipient_verify import RecipientVerifier
from relay.smtpd import SmtpdSession
from relay.spool import Spool, SpoolError, SpoolFullError
from relay.throttle import SenderCaps
from relay.tls import TlsContexts
from relay.users import UserDatabase

log = logging.getLogger(__name__)


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
        abuse: AbuseStore | None = None,
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
        # Per-client counts shared by every worker of this relay (relay.abuse, in the spool).
        self.abuse = abuse if abuse is not None else AbuseStore(spool.directory)
        self.verifier = RecipientVerifier()  # recipientChecks, with their files and callout cache
        self._admissions = 0
        # http listeners are the HTTP API's (relay.http_api), bound by relay.app
        self.listeners = {lc.name: _ListenerRuntime(lc) for lc in config.listeners if lc.mode != "http"}
        self.handoff: _ListenerRuntime | None = None
        if config.handoff is not None:
            self.handoff = _ListenerRuntime(handoff_listener(config.handoff.host, config.handoff.port))
        self.sessions: set[SmtpdSession] = set()
        self.stats = FrontStats()
        self.draining = False
        self._sender_caps: SenderCaps | None = None
        self.auth_failure_delay = 0.5  # seconds, times the session's failure count (capped)
        self.tls_handshake_timeout = 30.0  # seconds, STARTTLS and implicit TLS alike
        self._idle = asyncio.Event()
        self._idle.set()
        if any(p == "*" for p in config.accept_domains):
            log.warning("acceptDomains contains '*': ignored, it would make an open relay")

    # ------------------------------------------------------------------ lifecycle

    @property
    def sender_caps(self) -> SenderCaps:
        """The listeners' per-sender caps, in the table the workers share (made on first use)."""
        if self._sender_caps is None:
            self._sender_caps = SenderCaps()
        return self._sender_caps

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Bound (host, port) per listener name (useful with port 0)."""
        return {name: rt.address for name, rt in self.listeners.items()}

    def _runtimes(self) -> list[_ListenerRuntime]:
        return [*self.listeners.values(), *([self.handoff] if self.handoff is not None else [])]

    async def start(self) -> None:
        """Bind every listener (SO_REUSEPORT, so worker processes share the port) and serve;
        the handoff listener too, when configured."""
        loop = asyncio.get_running_loop()
        self.abuse.expire(self.config.abuse)
        for runtime in self._runtimes():
            listener = runtime.config
            sock = bind_socket(listener.host, listener.port)
            session = HandoffSession if runtime is self.handoff else FrontSession
            # No ssl= here, also for implicit TLS: the session layers TLS over the raw
            # connection itself (SmtpdSession._start_tls), so its slot is held from the TCP
            # accept and given back when that connection closes, handshake or not.
            runtime.server = await loop.create_server(functools.partial(session, self, listener), sock=sock)
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

    def begin_drain(self) -> None:
        """Stop taking mail, listeners still bound: new sessions (hand-offs too) get
        ``421 4.3.2``, idle sessions are closed with it, transactions in flight go on (each
        session closes after its transaction). Used by a scale-down drain and by SIGTERM."""
        self.draining = True
        for session in list(self.sessions):
            if not session.in_transaction:
                session.close_with(status.SHUTTING_DOWN)

    def end_drain(self) -> None:
        """Take mail again (the pod left ``drain.pods`` before it was removed)."""
        self.draining = False

    @property
    def busy(self) -> bool:
        """Whether any session is open (a transaction may be in flight)."""
        return bool(self.sessions)

    async def drain(self, grace: float) -> None:
        """Stop accepting: new sessions get 421 4.3.2, idle sessions are closed with 421 4.3.2,
        transactions in flight may finish within `grace` seconds; then everything is closed."""
        self.begin_drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        for session in list(self.sessions):
            session.close_with(status.SHUTTING_DOWN)
        await self.close()

    async def close(self) -> None:
        for runtime in self._runtimes():
            if runtime.server is not None:
                runtime.server.close()
        for session in list(self.sessions):
            session.close_with(status.SHUTTING_DOWN)
        for runtime in self._runtimes():
            if runtime.server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(runtime.server.wait_closed(), timeout=5)
        self.abuse.close()

    # ------------------------------------------------------------------ sessions

    def admit(self, session: SmtpdSession, *, count_client: bool = True) -> Reply | None:
        """Register a new connection (its slot, from the TCP accept); the reply to send instead
        of the banner, if refused. On a PROXY listener the client is not known yet:
        `count_client` is False there and the session calls `admit_client` after the header."""
        self.sessions.add(session)
        self._idle.clear()
        self.stats.sessions += 1
        metrics.SESSIONS.labels(session.listener.name).inc()
        limits = self.config.limits
        if self.draining:
            return status.SHUTTING_DOWN
        if len(self.sessions) > limits.max_connections:
            metrics.REJECTED.labels("connections").inc()
            return status.TOO_MANY_CONNECTIONS
        return self.admit_client(session) if count_client else None

    def admit_client(self, session: SmtpdSession) -> Reply | None:
        """Count the session against its client address (``session.client_ip``, the announced
        one behind a proxy) in this process and in the store all workers share; the refusal
        (relay.core.abuse), if that client is blocked or has too many connections."""
        key = session.client_ip
        session.counted_client = key
        self.stats.per_client[key] += 1
        config = self.config
        self._admissions += 1
        if self._admissions % 10000 == 0:
            self.abuse.expire(config.abuse)
        trusted = not session.proxy_unknown and client_is_trusted(key, config.trusted_networks)
        refusal = self.abuse.connect(key, trusted=trusted, limits=config.limits, abuse=config.abuse)
        if refusal is None:
            return None
        reply, reason = refusal
        metrics.REJECTED.labels(reason).inc()
        return reply

    # ------------------------------------------------------------------ storing

    async def store(self, prepared: Prepared, listener: str) -> Reply:
        """The one store step of every door (SMTP DATA, the HTTP API): store durably, count,
        log, tell the scheduler. Returns ``250 ... queued as ID`` only once the message is on
        disk, else the 4xx to answer; the caller's flow gate comes after."""
        entry = prepared.entry
        queue_id = entry.queue_id
        try:
            await self.spool.store(entry, prepared.data)
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
        self.stats.accepted += 1
        metrics.ACCEPTED.labels(listener).inc()
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s: accepted size=%d nrcpt=%d from=<%s>%s",
                queue_id,
                prepared.size,
                len(entry.envelope.recipients),
                entry.envelope.mail_from,
                " (bare line ends normalised)" if prepared.normalized else "",
                extra={  # relay.logs: the accepted event (its fields only where a line shows them)
                    "event": "accepted",
                    "queue_id": queue_id,
                    "sender": entry.envelope.mail_from,
                    "size": prepared.size,
                    "nrcpt": len(entry.envelope.recipients),
                    "client": entry.client_address,
                }
                if logs.per_recipient()
                else None,
            )
        if self.on_stored is not None:
            try:
                self.on_stored(queue_id)
            except Exception:  # the message is safe on disk; the scheduler's rescan finds it
                log.exception("%s: scheduler notification failed", queue_id)
        return status.QUEUED.with_text(f"Ok: queued as {queue_id}")

    def release(self, session: SmtpdSession) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self.stats.sessions -= 1
        key = session.counted_client
        if key is not None:
            session.counted_client = None
            self.stats.per_client[key] -= 1
            if self.stats.per_client[key] <= 0:
                del self.stats.per_client[key]
            self.abuse.disconnect(key)
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
