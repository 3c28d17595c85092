"""SMTP delivery (Postfix's smtp client): one transaction per call, on pooled connections.

The scheduler calls `SmtpClient.deliver(target, request)` (or the `SmtpTransport` wrapper, which
implements `relay.core.model.Transport` for relay and smarthost hops) and gets exactly one
`RecipientOutcome` per requested recipient back. Nothing here raises for a delivery failure: a
refused connection, a broken session or a timeout becomes deferred outcomes (4.4.1 / 4.4.2).

What one transaction does (RFC 5321 3.3, 4.1.1):
- take an idle connection for (host, port, TLS settings, credentials) from the pool and RSET it,
  or open a new one: connect (``queue.connectTimeout``), EHLO with our hostname, STARTTLS when
  the hop asks for it (``tls: starttls``; ``opportunistic`` for MX: used when offered, not
  verified) or TLS from the first byte (``tls: implicit``), certificates verified against the
  system store or ``caFile`` unless ``insecureSkipVerify``; AUTH with the ``username`` and
  ``password`` files of the hop's ``credentialsDir``;
- MAIL FROM with SIZE, BODY=8BITMIME, SMTPUTF8 and, when the server advertises DSN (RFC 3461),
  RET and ENVID; one RCPT per recipient with NOTIFY and ORCPT when DSN is advertised, recording
  each recipient's own reply; when the server lacks DSN every delivered outcome is marked
  ``relayed`` (RFC 3461 4.2: the DSN "relayed" action);
- MAIL, every RCPT and DATA in one write when the server advertises PIPELINING (RFC 2920),
  one at a time otherwise; a refused DATA leaves the transaction open, so the connection is
  RSET before reuse;
- DATA, waiting ``queue.dataTimeout`` (default 600 s, RFC 5321 4.5.3.2.6) for the reply after
  the final dot, so a slow server that did store the message does not receive a duplicate;
- a message that needs SMTPUTF8 is never sent to a server without it (bounced 5.6.7, RFC 6531
  3.4); an 8-bit body is converted to quoted-printable/base64 for a server without 8BITMIME
  (RFC 6152 3), and bounced 5.6.3 when it cannot be converted (8-bit bytes in the header).

Connections are reused across messages: at most ``queue.maxPerDestination`` per key, idle ones
are kept for `IDLE_SECONDS`. A connection that finished a transaction less than
`PROBE_AFTER_IDLE` seconds ago is reused as it is (the server is waiting for MAIL, RFC 5321
4.1.4; a closed one is noticed by the event loop and dropped); one idle for longer is probed
with RSET first. If a reused connection breaks before the server accepted MAIL, the
transaction is retried once on a new connection, so a stale pooled session never defers mail.

The wire protocol is `relay.smtp_client`, our own small client, not aiosmtplib (which `mailrelay
send` still uses). Measured (issue 7): aiosmtplib 5.1.3 cannot pipeline, so every message cost
four round trips, each with a send, a loop wakeup and a ``wait_for``, and the delivery side was
about 40% of the relay's CPU at 2 KB x 20 sessions; pipelined, a message costs two.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.encoders
import email.generator
import email.message
import email.policy
import io
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay.config import QueueConfig, RelayHop, SmarthostHop
from relay.core import outcome
from relay.core.dsn import as_xtext
from relay.core.headers import header_section
from relay.core.model import DeliveryRequest, Envelope, Recipient, RecipientOutcome
from relay.core.smtp_payload import data_payload
from relay.smtp_client import (
    ServerReply,
    SmtpConnection,
    SmtpError,
    SmtpReplyError,
    SmtpTlsError,
    TransactionReplies,
    UnsafeCommand,
    command_line,
)

log = logging.getLogger(__name__)

IDLE_SECONDS = 30.0  # keep an idle pooled connection this long (servers drop idle ones after minutes)
PROBE_AFTER_IDLE = 2.0  # RSET a pooled connection before reuse only after this long idle

TargetTls = Literal["none", "starttls", "implicit", "opportunistic"]


# --------------------------------------------------------------------------- pure helpers


def orcpt_param(orcpt: str) -> str:
    """``ORCPT=rfc822;a+2Bb@d.test`` from a stored ORCPT (the front keeps the wire form, xtext;
    a value that is not valid xtext is encoded)."""
    addr_type, sep, address = orcpt.partition(";")
    if not sep:
        addr_type, address = "rfc822", orcpt
    return f"ORCPT={addr_type.strip()};{as_xtext(address.strip())}"


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def needs_smtputf8(envelope: Envelope, recipients: Sequence[Recipient], content: bytes) -> bool:
    """RFC 6531: the message needs SMTPUTF8 when an address or a header field is not ASCII
    (an SMTPUTF8 flag on an all-ASCII message can simply be dropped)."""
    if not envelope.smtputf8:
        return False
    if not envelope.mail_from.isascii() or not all(r.address.isascii() for r in recipients):
        return True
    return has_8bit(header_section(content))


def downgrade_8bit(content: bytes) -> bytes | None:
    """RFC 6152 3 conversion for a server without 8BITMIME: every leaf part with 8-bit content
    is re-encoded (text/* as quoted-printable, the rest as base64); a message without MIME
    headers becomes ``text/plain; charset=unknown-8bit`` (RFC 1428). None when the header itself
    carries 8-bit bytes: that message cannot be made 7-bit (the caller bounces it with 5.6.3)."""
    if has_8bit(header_section(content)):
        return None
    policy = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)
    message = email.message_from_bytes(content, policy=policy)
    if "MIME-Version" not in message:
        message["MIME-Version"] = "1.0"
    if "Content-Type" not in message:
        message["Content-Type"] = "text/plain; charset=unknown-8bit"
    for part in message.walk():
        if part.is_multipart():
            if part.get("Content-Transfer-Encoding", "").lower() in ("8bit", "binary"):
                part.replace_header("Content-Transfer-Encoding", "7bit")
            continue
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes) or raw.isascii():
            continue
        del part["Content-Transfer-Encoding"]
        part.set_payload(raw.replace(b"\r\n", b"\n"))
        if part.get_content_maintype() == "text":
            email.encoders.encode_quopri(part)
        else:
            email.encoders.encode_base64(part)
    buffer = io.BytesIO()
    email.generator.BytesGenerator(buffer, mangle_from_=False, policy=policy).flatten(message)
    converted = buffer.getvalue()
    return converted if converted.isascii() else None


def ensure_crlf_end(content: bytes) -> bytes:
    return content if content.endswith(b"\r\n") or not content else content + b"\r\n"


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

    @property
    def name(self) -> str:
        return self.server_name or self.host

    @property
    def label(self) -> str:
        if self.server_name and self.server_name != self.host:
            return f"{self.server_name}[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def target_for_hop(hop: RelayHop | SmarthostHop) -> SmtpTarget:
    """A relay hop is SMTP to host:port without TLS or AUTH; a smarthost carries its settings."""
    if isinstance(hop, RelayHop):
        return SmtpTarget(host=hop.host, port=hop.port, tls="none", server_name=hop.host)
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


class _TransactionError(Exception):
    """A failure that applies to every recipient still open in the transaction."""

    def __init__(self, code: int, status: str, text: str, *, broken: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = text
        self.broken = broken
        self.before_mail = False  # the session failed before the server accepted MAIL


def _reply_error(reply: ServerReply) -> _TransactionError:
    """A refusal (greeting, EHLO, MAIL) that applies to every recipient, worded like an RCPT
    refusal: the enhanced status code apart from the text."""
    status, text = outcome.split_enhanced(reply.code, reply.text)
    return _TransactionError(reply.code, status, " ".join(text.split()))


@dataclass
class _Connection:
    smtp: SmtpConnection
    idle_since: float = 0.0
    used: int = 0

    def supports(self, extension: str) -> bool:
        return self.smtp.supports(extension)


@dataclass
class _Pool:
    limit: asyncio.Semaphore
    idle: list[_Connection] = field(default_factory=list)


# --------------------------------------------------------------------------- the client


class SmtpClient:
    """Pooled SMTP client shared by every SMTP hop of one scheduler."""

    def __init__(self, hostname: str, queue: QueueConfig) -> None:
        self.hostname = hostname
        self.queue = queue
        self._pools: dict[SmtpTarget, _Pool] = {}
        self._contexts: dict[tuple[bool, Path | None], ssl.SSLContext] = {}
        self.connections_opened = 0
        self._closed = False

    def update(self, hostname: str, queue: QueueConfig) -> None:
        """New settings from a reload; existing pools keep their limits until they drain."""
        self.hostname = hostname
        self.queue = queue

    def _pool(self, target: SmtpTarget) -> _Pool:
        pool = self._pools.get(target)
        if pool is None:
            pool = _Pool(asyncio.Semaphore(self.queue.max_per_destination))
            self._pools[target] = pool
        return pool

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

    async def _open(self, target: SmtpTarget) -> _Connection:
        """Connect, EHLO, TLS and AUTH; raises _TransactionError (never SmtpError)."""
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
            raise _TransactionError(421, "4.7.5", f"TLS handshake with {target.label} failed: {exc}") from exc
        except SmtpReplyError as exc:
            raise _reply_error(exc.reply) from exc
        except SmtpError as exc:
            raise _TransactionError(421, "4.4.1", f"connection to {target.label} failed: {exc}") from exc
        self.connections_opened += 1
        connection = _Connection(smtp)
        try:
            await self._hello(smtp)
            if target.tls == "starttls" or (target.tls == "opportunistic" and smtp.supports("starttls")):
                if not smtp.supports("starttls"):
                    raise _TransactionError(421, "4.7.10", f"{target.label} does not offer STARTTLS")
                assert context is not None
                try:
                    await smtp.starttls(context, target.name, queue.command_timeout)
                except SmtpReplyError as exc:
                    raise _TransactionError(
                        421, "4.7.0", f"STARTTLS refused by {target.label}: {exc.reply.text}"
                    ) from exc
                except SmtpError as exc:
                    raise _TransactionError(
                        421, "4.7.5", f"TLS handshake with {target.label} failed: {exc}"
                    ) from exc
                try:
                    await self._hello(smtp)
                except _TransactionError as exc:  # TLS 1.3 reports a refused handshake only now
                    raise _TransactionError(
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
            raise _reply_error(exc.reply) from exc
        except (SmtpError, UnicodeEncodeError) as exc:
            raise _TransactionError(421, "4.4.2", f"greeting failed: {exc}", broken=True) from exc

    async def _login(self, smtp: SmtpConnection, target: SmtpTarget) -> None:
        assert target.credentials_dir is not None
        try:
            username, password = await asyncio.to_thread(read_credentials, target.credentials_dir)
        except OSError as exc:
            raise _TransactionError(
                451, "4.7.0", f"cannot read credentials from {target.credentials_dir}: {exc.strerror}"
            ) from exc
        try:
            await smtp.authenticate(username, password, self.queue.command_timeout)
        except SmtpReplyError as exc:
            # A rejected login is a configuration problem on our side: keep the mail (defer).
            raise _TransactionError(
                454, "4.7.8", f"authentication to {target.label} failed: {exc.reply}"
            ) from exc
        except SmtpError as exc:
            raise _TransactionError(454, "4.7.8", f"authentication to {target.label} failed: {exc}") from exc

    async def _acquire(self, target: SmtpTarget) -> _Connection:
        pool = self._pool(target)
        now = time.monotonic()
        while pool.idle:
            connection = pool.idle.pop()
            if now - connection.idle_since > IDLE_SECONDS or not connection.smtp.is_connected:
                connection.smtp.close()
                continue
            if now - connection.idle_since < PROBE_AFTER_IDLE:
                return connection  # busy and known good: no RSET round trip
            try:
                reply = await connection.smtp.rset(self.queue.command_timeout)
            except SmtpError:
                connection.smtp.close()
                continue
            if reply.code == 250:
                return connection
            connection.smtp.close()
        return await self._open(target)

    def _release(self, target: SmtpTarget, connection: _Connection, reusable: bool) -> None:
        if reusable and connection.smtp.is_connected and not self._closed:
            connection.idle_since = time.monotonic()
            connection.used += 1
            self._pool(target).idle.append(connection)
        else:
            connection.smtp.close()

    def prune(self) -> None:
        """Close idle connections older than IDLE_SECONDS (the scheduler calls this periodically)."""
        now = time.monotonic()
        for pool in self._pools.values():
            keep = []
            for connection in pool.idle:
                if now - connection.idle_since > IDLE_SECONDS or not connection.smtp.is_connected:
                    connection.smtp.close()
                else:
                    keep.append(connection)
            pool.idle = keep

    def idle_connections(self) -> int:
        return sum(len(pool.idle) for pool in self._pools.values())

    async def close(self) -> None:
        """QUIT every idle connection."""
        self._closed = True
        idle = [c for pool in self._pools.values() for c in pool.idle]
        for pool in self._pools.values():
            pool.idle = []

        async def quit_one(connection: _Connection) -> None:
            with contextlib.suppress(SmtpError):
                await connection.smtp.quit(5)
            connection.smtp.close()

        await asyncio.gather(*(quit_one(c) for c in idle))

    # ----------------------------------------------------------------- one transaction

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
        pool = self._pool(target)
        async with pool.limit:
            for fresh_retry in (False, True):
                try:
                    connection = await (self._open(target) if fresh_retry else self._acquire(target))
                except _TransactionError as exc:
                    return [self._failure(r, exc, target) for r in recipients]
                results: dict[int, RecipientOutcome] = {}
                reusable = False
                try:
                    reusable = await self._transaction(connection, target, request, results)
                except _TransactionError as exc:
                    reusable = False
                    if exc.before_mail and connection.used and not fresh_retry:
                        # a pooled session that went stale: nothing was sent, use a new one
                        log.info("pooled connection to %s broke (%s); reconnecting", target.label, exc.text)
                        connection.smtp.close()
                        continue
                    for index, recipient in enumerate(recipients):
                        if index not in results:
                            results[index] = self._failure(recipient, exc, target)
                except asyncio.CancelledError:
                    connection.smtp.abort()
                    raise
                finally:
                    self._release(target, connection, reusable)
                break
            return [results[i] for i in range(len(recipients))]

    def _failure(
        self, recipient: Recipient, error: _TransactionError, target: SmtpTarget
    ) -> RecipientOutcome:
        if error.status.startswith("4.4.1"):
            return outcome.connection_failed(recipient, error.text, remote_mta=target.name)
        if error.broken:
            return outcome.connection_broken(recipient, error.text, remote_mta=target.name)
        if error.status.startswith("4."):
            return outcome.deferred(
                recipient, error.status, error.text, code=error.code, remote_mta=target.name
            )
        if error.status.startswith("5."):
            return outcome.bounced(
                recipient, error.status, error.text, code=error.code, remote_mta=target.name
            )
        return outcome.from_reply(recipient, error.code, error.text, remote_mta=target.name)

    async def _transaction(
        self,
        connection: _Connection,
        target: SmtpTarget,
        request: DeliveryRequest,
        results: dict[int, RecipientOutcome],
    ) -> bool:
        """Run MAIL/RCPT/DATA; fill `results`; return whether the connection can be reused."""
        smtp = connection.smtp
        envelope = request.message.entry.envelope
        recipients = request.recipients
        content = ensure_crlf_end(request.message.content)
        remote = target.name

        utf8 = needs_smtputf8(envelope, recipients, content)
        if utf8 and not connection.supports("smtputf8"):
            for index, recipient in enumerate(recipients):
                results[index] = outcome.bounced(
                    recipient,
                    "5.6.7",
                    f"{target.label} does not support SMTPUTF8, which this message requires (RFC 6531)",
                    code=553,
                    remote_mta=remote,
                )
            return True
        eight_bit = has_8bit(content)
        if eight_bit and not connection.supports("8bitmime") and not utf8:
            converted = downgrade_8bit(content)
            if converted is None:
                for index, recipient in enumerate(recipients):
                    results[index] = outcome.bounced(
                        recipient,
                        "5.6.3",
                        f"{target.label} does not support 8BITMIME and the message "
                        "cannot be converted to 7 bit",
                        code=554,
                        remote_mta=remote,
                    )
                return True
            content, eight_bit = converted, False

        dsn = connection.supports("dsn")
        encoding = "utf-8" if utf8 else "ascii"
        mail_options: list[bytes] = []
        if connection.supports("size"):
            mail_options.append(b"SIZE=%d" % len(content))
        if connection.supports("8bitmime") and (eight_bit or envelope.body == "8BITMIME"):
            mail_options.append(b"BODY=8BITMIME")
        if utf8:
            mail_options.append(b"SMTPUTF8")
        if dsn:
            if envelope.ret:
                mail_options.append(f"RET={envelope.ret}".encode())
            if envelope.envid:
                mail_options.append(f"ENVID={as_xtext(envelope.envid)}".encode())
        try:
            mail_line = command_line(
                b"MAIL FROM:<" + envelope.mail_from.encode(encoding) + b">", *mail_options
            )
            rcpt_lines = []
            for recipient in recipients:
                options: list[bytes] = []
                if dsn:
                    if recipient.notify:
                        options.append(("NOTIFY=" + ",".join(recipient.notify)).encode())
                    if recipient.orcpt:
                        options.append(orcpt_param(recipient.orcpt).encode())
                rcpt_lines.append(
                    command_line(b"RCPT TO:<" + recipient.address.encode(encoding) + b">", *options)
                )
        except UnicodeEncodeError as exc:  # pragma: no cover - needs_smtputf8 covers this
            raise _TransactionError(553, "5.6.7", f"address cannot be sent without SMTPUTF8: {exc}") from exc
        except UnsafeCommand as exc:  # the front refuses such addresses; never put them on the wire
            raise _TransactionError(553, "5.1.3", f"address cannot be sent: {exc}") from exc

        replies = TransactionReplies()
        failure: SmtpError | None = None
        try:
            await smtp.send_mail(
                mail_line,
                rcpt_lines,
                data_payload(content),
                replies,
                command_timeout=self.queue.command_timeout,
                data_timeout=self.queue.data_timeout,
            )
        except SmtpError as exc:
            failure = exc

        mail = replies.mail
        if mail is None:
            error = _TransactionError(421, "4.4.2", f"MAIL failed: {failure}", broken=True)
            error.before_mail = True
            raise error from failure
        if mail.code != 250:
            error = _reply_error(mail)
            error.before_mail = mail.code == 421  # the server is closing this session
            raise error

        accepted: list[int] = []
        for index, reply in enumerate(replies.recipients):
            if reply.code in (250, 251):
                accepted.append(index)
            else:
                results[index] = outcome.from_reply(
                    recipients[index], reply.code, reply.text, remote_mta=remote
                )
        if len(replies.recipients) < len(recipients):  # 421 at RCPT, or the connection broke
            text = f"RCPT failed: {failure}" if failure else replies.recipients[-1].text
            raise _TransactionError(421, "4.4.2", text, broken=True) from failure

        if not accepted:
            if failure is not None:
                return False
            try:
                reply = await smtp.rset(self.queue.command_timeout)
            except SmtpError:
                return False
            return reply.code == 250

        data = replies.data
        final = replies.final if data is not None and data.code == 354 else data
        if final is None:
            step = "DATA" if data is None or not replies.content_sent else "the reply to the final dot"
            raise _TransactionError(421, "4.4.2", f"{step} failed: {failure}", broken=True) from failure
        for index in accepted:
            results[index] = outcome.from_reply(
                recipients[index], final.code, final.text, remote_mta=remote, relayed=not dsn
            )
        if final is data and smtp.is_connected:
            # DATA refused: the transaction (MAIL, RCPT) is still open at the server
            try:
                return (await smtp.rset(self.queue.command_timeout)).code == 250
            except SmtpError:
                return False
        return smtp.is_connected


class SmtpTransport:
    """`relay.core.model.Transport` for one relay or smarthost hop, on a shared `SmtpClient`."""

    def __init__(self, client: SmtpClient, target: SmtpTarget) -> None:
        self.client = client
        self.target = target

    async def deliver(self, request: DeliveryRequest) -> Sequence[RecipientOutcome]:
        return await self.client.deliver(self.target, request)

    async def close(self) -> None:
        """The pool belongs to the client; nothing to close per hop."""
