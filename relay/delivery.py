"""SMTP delivery (Postfix's smtp client): one transaction per call, on pooled connections.

The scheduler's hops (relay.hops) call `SmtpClient.deliver(target, request)` for relay,
smarthost and MX hops and get exactly one `RecipientOutcome` per requested recipient back.
Nothing here raises for a delivery failure: a refused connection, a broken session or a timeout
becomes deferred outcomes (4.4.1 / 4.4.2).

What one delivery does (RFC 5321 3.3, 4.1.1):
- take an idle connection for (host, port, TLS settings, credentials) from the pool
  (relay.smtp_pool), or open a new one: connect (``queue.connectTimeout``), EHLO with our
  hostname, STARTTLS when the hop asks for it (``tls: starttls``; ``opportunistic`` for MX:
  used when offered, not verified) or TLS from the first byte (``tls: implicit``),
  certificates verified against the system store or ``caFile`` unless
  ``insecureSkipVerify``; AUTH with the ``username`` and ``password`` files of the hop's
  ``credentialsDir``;
- run the transaction: relay.smtp_transaction's pure `prepare` decides the MAIL and RCPT
  lines and the payload (SMTPUTF8, 8BITMIME conversion, DSN parameters), then
  `SmtpConnection.send_mail` sends them (MAIL, every RCPT and DATA in one write when the server
  advertises PIPELINING, RFC 2920, one at a time otherwise), then the pure `interpret` reads the
  replies into outcomes and says whether the session may be reused, needs RSET, or is dropped;
- a request with a DKIM plan (relay.core.dkim, chosen by relay.hops) is signed by relay.dkim
  inside `prepare`, after the 8BITMIME conversion: the signature covers the bytes sent; a key
  that cannot be used defers the recipients (451 4.3.5) rather than sending unsigned mail;
- DATA waits ``queue.dataTimeout`` (default 600 s, RFC 5321 4.5.3.2.6) for the reply after
  the final dot, so a slow server that did store the message does not receive a duplicate.

Connections are reused across messages: at most ``queue.maxPerDestination`` per key, idle ones
kept and probed as relay.smtp_pool describes. If a reused connection breaks before the server
accepted MAIL, the transaction is retried once on a new connection, so a stale pooled session
never defers mail. Opportunistic TLS that fails is retried once without TLS (RFC 7435).

The wire protocol is `relay.smtp_client`, our own small client, not aiosmtplib (which `mailrelay
send` still uses). Measured (issue 7): aiosmtplib 5.1.3 cannot pipeline, so every message cost
four round trips, each with a send, a loop wakeup and a ``wait_for``, and the delivery side was
about 40% of the relay's CPU at 2 KB x 20 sessions; pipelined, a message costs two.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from relay import metrics
from relay.config import QueueConfig, RelayHop, SmarthostHop
from relay.core.model import DeliveryRequest, Recipient, RecipientOutcome
from relay.dkim import DkimKeyError, Signer
from relay.smtp_client import SmtpConnection, SmtpError, SmtpReplyError, SmtpTlsError, TransactionReplies
from relay.smtp_pool import ConnectionPool, PooledConnection
from relay.smtp_transaction import (
    Prepared,
    TransactionError,
    Verdict,
    failure_outcome,
    interpret,
    prepare,
    reply_error,
)

log = logging.getLogger(__name__)

TargetTls = Literal["none", "starttls", "implicit", "opportunistic"]


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class SmtpTarget:
    """Where one transaction goes. `host` is what we connect to (a name or an address);
    `server_name` is the name TLS verifies and DSNs report as Remote-MTA."""

    host: str
    port: int
    tls: TargetTls = "none"
    server_name: str = ""
    verify: bool = True
    ca_file: Path | None = None
    credentials_dir: Path | None = None
    policy: str = ""  # MX hops: the TLS policy applied (counted per report_domain)
    report_domain: str = ""

    @property
    def name(self) -> str:
        return self.server_name or self.host

    @property
    def label(self) -> str:
        if self.server_name and self.server_name != self.host:
            return f"{self.server_name}[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def target_for_hop(hop: RelayHop | SmarthostHop) -> SmtpTarget:
    """A relay hop is SMTP to host:port without AUTH, with STARTTLS (verified against its CA
    with starttls-verify) when it asks for it; a smarthost carries its settings."""
    if isinstance(hop, RelayHop):
        return SmtpTarget(
            host=hop.host,
            port=hop.port,
            tls="none" if hop.tls == "none" else "starttls",
            server_name=hop.host,
            verify=hop.tls == "starttls-verify",
            ca_file=hop.ca_file,
        )
    return SmtpTarget(
        host=hop.host,
        port=hop.port,
        tls=hop.tls,
        server_name=hop.host,
        verify=not hop.insecure_skip_verify,
        ca_file=hop.ca_file,
        credentials_dir=hop.credentials_dir,
    )


def read_credentials(directory: Path) -> tuple[str, str]:
    """The ``username`` and ``password`` files of a mounted basic-auth Secret."""
    username = (directory / "username").read_text(encoding="utf-8").strip("\r\n")
    password = (directory / "password").read_text(encoding="utf-8").strip("\r\n")
    return username, password


# --------------------------------------------------------------------------- the client


class SmtpClient:
    """Pooled SMTP client shared by every SMTP hop of one scheduler."""

    def __init__(self, hostname: str, queue: QueueConfig) -> None:
        self.hostname = hostname
        self.queue = queue
        self.pool = ConnectionPool(queue.max_per_destination)
        self._contexts: dict[tuple[bool, Path | None], ssl.SSLContext] = {}
        self.connections_opened = 0
        self.signer = Signer()

    def update(self, hostname: str, queue: QueueConfig) -> None:
        """New settings from a reload; existing destinations keep their limits."""
        self.hostname = hostname
        self.queue = queue
        self.pool.per_destination = queue.max_per_destination

    def prune(self) -> None:
        """Close idle connections past their time (the scheduler calls this periodically)."""
        self.pool.prune()

    def idle_connections(self) -> int:
        return self.pool.idle_connections()

    async def close(self) -> None:
        """QUIT every idle connection."""
        await self.pool.close()

    def _tls_context(self, verify: bool, ca_file: Path | None) -> ssl.SSLContext:
        key = (verify, ca_file)
        context = self._contexts.get(key)
        if context is None:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._contexts[key] = context
        return context

    # ----------------------------------------------------------------- connections

    async def _open(self, target: SmtpTarget) -> PooledConnection:
        """Connect, EHLO, TLS and AUTH; raises TransactionError (never SmtpError). Sessions to
        MX hosts are counted TLS-RPT style (verified, unverified, cleartext, failed)."""
        if not target.policy:
            return await self._connect(target)
        labels = {"domain": target.report_domain, "policy": target.policy}
        try:
            connection = await self._connect(target)
        except TransactionError as exc:
            if exc.status.startswith(("4.7.5", "4.7.10")):
                metrics.TLS_SESSIONS.labels(**labels, result="failed").inc()
            raise
        if connection.smtp.tls:
            result = "verified" if target.verify and target.tls != "opportunistic" else "unverified"
        else:
            result = "cleartext"
        metrics.TLS_SESSIONS.labels(**labels, result=result).inc()
        return connection

    async def _connect(self, target: SmtpTarget) -> PooledConnection:
        queue = self.queue
        verify = target.verify and target.tls != "opportunistic"
        context = self._tls_context(verify, target.ca_file) if target.tls != "none" else None
        try:
            smtp = await SmtpConnection.open(
                target.host,
                target.port,
                timeout=queue.connect_timeout,
                tls_context=context if target.tls == "implicit" else None,
                server_hostname=target.name,
            )
        except SmtpTlsError as exc:
            raise TransactionError(421, "4.7.5", f"TLS handshake with {target.label} failed: {exc}") from exc
        except SmtpReplyError as exc:
            raise reply_error(exc.reply) from exc
        except SmtpError as exc:
            raise TransactionError(421, "4.4.1", f"connection to {target.label} failed: {exc}") from exc
        self.connections_opened += 1
        connection = PooledConnection(smtp)
        try:
            await self._hello(smtp)
            if target.tls == "starttls" or (target.tls == "opportunistic" and smtp.supports("starttls")):
                if not smtp.supports("starttls"):
                    raise TransactionError(421, "4.7.10", f"{target.label} does not offer STARTTLS")
                assert context is not None
                try:
                    await smtp.starttls(context, target.name, queue.command_timeout)
                except SmtpReplyError as exc:
                    raise TransactionError(
                        421, "4.7.0", f"STARTTLS refused by {target.label}: {exc.reply.text}"
                    ) from exc
                except SmtpError as exc:
                    raise TransactionError(
                        421, "4.7.5", f"TLS handshake with {target.label} failed: {exc}"
                    ) from exc
                try:
                    await self._hello(smtp)
                except TransactionError as exc:  # TLS 1.3 reports a refused handshake only now
                    raise TransactionError(
                        421, "4.7.5", f"TLS session with {target.label} failed: {exc.text}"
                    ) from exc
            if target.credentials_dir is not None:
                await self._login(smtp, target)
        except BaseException:
            smtp.abort()
            raise
        return connection

    async def _hello(self, smtp: SmtpConnection) -> None:
        try:
            await smtp.hello(self.hostname, self.queue.command_timeout)
        except SmtpReplyError as exc:
            raise reply_error(exc.reply) from exc
        except (SmtpError, UnicodeEncodeError) as exc:
            raise TransactionError(421, "4.4.2", f"greeting failed: {exc}", broken=True) from exc

    async def _login(self, smtp: SmtpConnection, target: SmtpTarget) -> None:
        assert target.credentials_dir is not None
        try:
            username, password = await asyncio.to_thread(read_credentials, target.credentials_dir)
        except OSError as exc:
            raise TransactionError(
                451, "4.7.0", f"cannot read credentials from {target.credentials_dir}: {exc.strerror}"
            ) from exc
        try:
            await smtp.authenticate(username, password, self.queue.command_timeout)
        except SmtpReplyError as exc:
            # A rejected login is a configuration problem on our side: keep the mail (defer).
            raise TransactionError(
                454, "4.7.8", f"authentication to {target.label} failed: {exc.reply}"
            ) from exc
        except SmtpError as exc:
            raise TransactionError(454, "4.7.8", f"authentication to {target.label} failed: {exc}") from exc

    # ----------------------------------------------------------------- one delivery

    async def deliver(self, target: SmtpTarget, request: DeliveryRequest) -> list[RecipientOutcome]:
        """One SMTP transaction for `request.recipients` at `target`: one outcome per recipient."""
        recipients = request.recipients
        if not recipients:
            return []
        if target.tls == "opportunistic":
            results = await self._deliver_once(target, request)
            if any(r.status == "4.7.5" for r in results):
                # RFC 3207 4.1 / RFC 7435: opportunistic TLS that fails falls back to cleartext
                log.info("TLS with %s failed; retrying without TLS", target.label)
                return await self._deliver_once(dataclasses.replace(target, tls="none"), request)
            return results
        return await self._deliver_once(target, request)

    async def _deliver_once(self, target: SmtpTarget, request: DeliveryRequest) -> list[RecipientOutcome]:
        recipients = request.recipients
        async with self.pool.slots(target):
            for fresh_retry in (False, True):
                try:
                    connection = await self._connection(target, fresh=fresh_retry)
                except TransactionError as exc:
                    return [failure_outcome(r, exc, target.name) for r in recipients]
                reusable = False
                try:
                    verdict = await self._transaction(connection, target, request)
                    reusable = await self._settle_session(connection, verdict)
                except asyncio.CancelledError:
                    connection.smtp.abort()
                    raise
                finally:
                    self.pool.give_back(target, connection, reusable)
                error = verdict.error
                if error is not None and error.before_mail and connection.used and not fresh_retry:
                    # a pooled session that went stale: nothing was sent, use a new one
                    log.info("pooled connection to %s broke (%s); reconnecting", target.label, error.text)
                    continue
                break
            results = verdict.results
            if error is not None:
                for index, recipient in enumerate(recipients):
                    if index not in results:
                        results[index] = failure_outcome(recipient, error, target.name)
            return [results[i] for i in range(len(recipients))]

    async def _connection(self, target: SmtpTarget, *, fresh: bool) -> PooledConnection:
        if not fresh:
            pooled = await self.pool.take(target, self.queue.command_timeout)
            if pooled is not None:
                return pooled
        return await self._open(target)

    async def _transaction(
        self, connection: PooledConnection, target: SmtpTarget, request: DeliveryRequest
    ) -> Verdict:
        """Prepare, send (the one await), interpret."""
        try:
            sign = self.signer.signature
            supports = connection.supports
            prepared = prepare(request, supports, label=target.label, remote=target.name, sign=sign)
        except DkimKeyError as exc:
            log.error("[%s] %s; deferring", request.message.entry.queue_id, exc)
            return Verdict(error=TransactionError(451, "4.3.5", f"cannot sign the message: {exc}"))
        if not isinstance(prepared, Prepared):
            return prepared
        return await send_prepared(
            connection.smtp,
            prepared,
            request.recipients,
            command_timeout=self.queue.command_timeout,
            data_timeout=self.queue.data_timeout,
            remote=target.name,
        )

    async def _settle_session(self, connection: PooledConnection, verdict: Verdict) -> bool:
        """Whether the session goes back to the pool: RSET it first when the verdict asks."""
        if verdict.after != "rset":
            return verdict.after == "reuse"
        try:
            return (await connection.smtp.rset(self.queue.command_timeout)).code == 250
        except SmtpError:
            return False


async def send_prepared(
    smtp: SmtpConnection,
    prepared: Prepared,
    pending: tuple[Recipient, ...],
    *,
    command_timeout: float,
    data_timeout: float,
    remote: str,
) -> Verdict:
    """The one await of a transaction (relay.smtp_transaction's prepare and interpret around
    it): send `prepared` on `smtp`, then what became of each of `pending`. Delivery and the
    scale-down hand-off (relay.handoff) both send this way."""
    replies = TransactionReplies()
    failure: SmtpError | None = None
    try:
        await smtp.send_mail(
            prepared.mail,
            prepared.rcpts,
            prepared.payload,
            replies,
            command_timeout=command_timeout,
            data_timeout=data_timeout,
        )
    except SmtpError as exc:
        failure = exc
    return interpret(prepared, pending, replies, failure=failure, connected=smtp.is_connected, remote=remote)
