"""The front's SMTP commands: one session's greeting, STARTTLS, AUTH and mail transaction.

`FrontSession` answers every command the relay accepts (HELO, EHLO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT, VRFY, EXPN, HELP, STARTTLS, AUTH) on the machinery of relay.smtpd (connection,
slot, TLS layer, idle timer, command loop, replies). The decisions are pure and live elsewhere:
command syntax and parameters in relay.core.smtp_syntax, the SASL exchange in
relay.core.sasl, each recipient in relay.core.rcpt.decide_rcpt (relay permission, postmaster,
duplicates, recipient limit, route), the end of DATA in relay.core.smtp_data, and the received
message's refusals, trace header and queue entry in relay.core.accept.prepare_message. What is
left here is the session state, the metrics and log lines, the password check in a thread
(relay.users), the brute-force delay (``auth_failure_delay`` times the session's failures, at
most 5 s) and cut-off (``auth.maxFailures``, then ``421 4.7.0``), storing and the flow gate.

Choices worth knowing: AUTH needs EHLO and TLS (``538 5.7.11`` without), and is refused during
a transaction. MAIL needs AUTH first (``530 5.7.0``) on a listener with ``auth: required``,
and on a submission listener unless the client is in a trusted network. An authenticated user
whose users-file entry lists ``senders`` gets ``553 5.7.1`` for a MAIL FROM outside them (and,
in relay.core.accept, for such a ``From:``): relay.core.senders. STARTTLS discards the
session state (RFC 3207 4.2). A duplicate recipient is answered 250 and kept once. DATA is
read by relay.smtpd (in chunks, not line by line).

What it must not do: answer 250 to DATA before ``await spool.store`` returned; decide delivery
(the scheduler does).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from relay import logs, metrics
from relay.config import ListenerConfig
from relay.core import sasl, status
from relay.core.accept import Arrival, Prepared, Refused, prepare_message
from relay.core.addresses import client_is_trusted
from relay.core.model import Recipient
from relay.core.rcpt import decide_rcpt
from relay.core.senders import not_owned, sender_allowed
from relay.core.smtp_data import DataDecoder
from relay.core.smtp_syntax import (
    CommandError,
    MailParams,
    ParsedPath,
    parse_mail_params,
    parse_path,
    valid_helo,
)
from relay.core.status import Reply
from relay.core.throttle import sender_key
from relay.smtpd import SmtpdSession
from relay.spool import new_queue_id
from relay.tls import describe

if TYPE_CHECKING:
    from relay.front import Front

log = logging.getLogger("relay.front")  # one logger name for the whole front


class FrontSession(SmtpdSession):
    """One SMTP connection. Commands are answered in the order they arrive (pipelining)."""

    def __init__(self, front: Front, listener: ListenerConfig) -> None:
        self.in_data = False
        self._auth_failures = 0
        self._trust: tuple[object, str, bool] | None = None  # (networks, client address, trusted)
        self._reset_transaction()
        super().__init__(front, listener)

    # ------------------------------------------------------------------ state

    def _reset_transaction(self) -> None:
        self._queue_id = ""
        self._mail: ParsedPath | None = None
        self._mail_params: MailParams | None = None
        self._rcpts: list[Recipient] = []
        self._rcpt_seen: set[str] = set()

    def _refusal(self, reason: str | None, reply: Reply | str) -> dict[str, object] | None:
        """The event fields of a refused RCPT or message (relay.logs; JSON lines only)."""
        if not logs.per_recipient():
            return None
        fields: dict[str, object] = {
            "event": "rejected",
            "queue_id": self._queue_id,
            "client": self.client_ip,
        }
        if reason is not None:
            fields["reason"] = reason
        if isinstance(reply, Reply):
            fields.update(code=reply.code, dsn=reply.status, reply=reply.text)
        else:
            fields["reply"] = reply
        if self._mail is not None:
            fields["sender"] = self._mail.address
        return fields

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self._reset_transaction()

    @property
    def in_transaction(self) -> bool:
        return self._mail is not None or self.in_data

    @property
    def trusted(self) -> bool:
        if self.proxy_unknown:  # a proxy's own connection: its address is not a client's
            return False
        networks, client_ip = self.front.config.trusted_networks, self.client_ip
        trust = self._trust
        if trust is None or trust[0] is not networks or trust[1] != client_ip:  # once per session
            trust = self._trust = (networks, client_ip, client_is_trusted(client_ip, networks))
        return trust[2]

    def _tag(self) -> str:
        return self._queue_id or super()._tag()

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
            keywords.append("AUTH " + " ".join(sasl.MECHANISMS))
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

    def _auth_refusal(self) -> Reply | None:
        """Why AUTH may not start now, if it may not."""
        assert self.session is not None
        if self.listener.auth == "none" or self.front.users is None:
            return status.AUTH_NOT_AVAILABLE
        if not self.session.host_name or not self.session.extended_smtp:
            return status.NEED_HELO.with_text("Send EHLO first")
        if not self.secure:
            return status.TLS_REQUIRED_FOR_AUTH
        if self.session.authenticated:
            return status.AUTH_ALREADY
        if self._mail is not None:
            return status.AUTH_IN_TRANSACTION
        return None

    async def smtp_AUTH(self, arg: str | None) -> None:
        if self.front.abuse.blocked(self.client_ip):  # blocked since this session began
            metrics.REJECTED.labels("blocked").inc()
            await self.reply(status.CLIENT_BLOCKED)
            self._close()
            return
        refusal = self._auth_refusal()
        exchange = sasl.start(arg) if refusal is None else refusal
        if isinstance(exchange, Reply):
            await self.reply(exchange)
            return
        credentials = await self._sasl_exchange(exchange)
        if credentials is None:
            return  # cancelled, malformed (answered) or the client went away
        users = self.front.users
        assert users is not None and self.session is not None
        users.refresh()
        if await asyncio.to_thread(users.verify, credentials.user, credentials.password):
            self.session.authenticated = True
            self.session.auth_data = credentials.user  # type: ignore[assignment]
            log.info("session %s: authenticated as %s", self.client_ip, credentials.user)
            await self.reply(status.AUTH_OK)
            return
        await self._auth_failed(credentials.user)

    async def _sasl_exchange(self, exchange: sasl.SaslExchange) -> sasl.Credentials | None:
        """Run the 334 challenges until credentials (None: refused and answered, or gone)."""
        step = exchange.first()
        while isinstance(step, sasl.Challenge):
            await self.push(step.line)
            line = await self._reader.readline()
            if not line:
                self._close()
                return None
            step = exchange.answer(line)
        if isinstance(step, Reply):
            if step is sasl.CANCELLED:
                log.info("session %s: AUTH cancelled by the client", self.client_ip)
            await self.reply(step)
            return None
        return step

    async def _auth_failed(self, user: str) -> None:
        self._auth_failures += 1
        metrics.REJECTED.labels("auth").inc()
        log.info("session %s: authentication failed for %r (%d)", self.client_ip, user, self._auth_failures)
        await asyncio.sleep(min(self.front.auth_failure_delay * self._auth_failures, 5.0))
        if self.front.abuse.auth_failed(self.client_ip, self.front.config.abuse):
            await self.reply(status.CLIENT_BLOCKED)
            self._close()
            return
        auth = self.front.config.auth
        if auth is not None and self._auth_failures >= auth.max_failures:
            await self.reply(status.TOO_MANY_AUTH_FAILURES)
            self._close()
            return
        await self.reply(status.AUTH_FAILED)

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
        too_much = self.front.abuse.message(
            self.client_ip, trusted=self.trusted, abuse=self.front.config.abuse
        )
        if too_much is not None:
            metrics.REJECTED.labels(too_much[1]).inc()
            log.info("session %s: MAIL refused: %s", self.client_ip, too_much[0])
            await self.reply(too_much[0])
            self._close()
            return
        login = self._login()
        if login is not None and not sender_allowed(path.address, self._senders(login)):
            metrics.REJECTED.labels("sender_login_mismatch").inc()
            log.info("session %s: MAIL refused: <%s> not owned by %s", self.client_ip, path.address, login)
            await self.reply(not_owned(path.address, login))
            return
        caps = self.listener.sender_limits
        if caps is not None:
            key = sender_key(login, path.address)
            if not self.front.sender_caps.allow(self.listener.name, caps, key):
                metrics.REJECTED.labels("sender_rate").inc()
                log.info("session %s: MAIL refused: sender cap of %s reached", self.client_ip, key)
                await self.reply(status.SENDER_RATE_LIMITED)
                return
        self._mail = path
        self._mail_params = params
        self._queue_id = new_queue_id()
        log.info("%s: client=[%s] from=<%s>", self._queue_id, self.client_ip, path.address)
        await self.reply(status.SENDER_OK)

    def _login(self) -> str | None:
        """The user this session authenticated as, if it did."""
        if not self.authenticated or self.session is None:
            return None
        return str(self.session.auth_data)

    def _senders(self, login: str) -> tuple[str, ...] | None:
        return self.front.users.senders(login) if self.front.users is not None else None

    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self.reply(status.NEED_HELO)
            return
        if self._mail is None or self._mail_params is None:
            await self.reply(status.NEED_MAIL)
            return
        decision = decide_rcpt(
            arg,
            mail_from=self._mail.address,
            smtputf8=self._mail_params.smtputf8,
            esmtp=self.session.extended_smtp,
            trusted=self.trusted,
            authenticated=self.authenticated,
            accepted=self._rcpt_seen,
            config=self.front.config,
            routes=self.front.routes,
        )
        if decision.reason is not None:
            metrics.REJECTED.labels(decision.reason).inc()
        if decision.log is not None:
            log.info(
                "%s: %s", self._queue_id, decision.log, extra=self._refusal(decision.reason, decision.reply)
            )
        if decision.recipient is not None and self.front.config.recipient_checks:
            refusal = await self.front.verifier.verify(
                decision.recipient.address, decision.route, self.front.config
            )
            if refusal is not None:
                metrics.REJECTED.labels("unknown_recipient" if refusal.code >= 500 else "unverified").inc()
                log.info("%s: to=<%s> refused: %s", self._queue_id, decision.recipient.address, refusal)
                await self.reply(refusal)
                return
        if decision.recipient is not None:
            self._rcpts.append(decision.recipient)
            self._rcpt_seen.add(decision.recipient.address)
        await self.reply(decision.reply)

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

    def _arrival(self) -> Arrival:
        assert self.session is not None
        now = self.front.clock()
        return Arrival(
            client_ip=self.client_ip,
            helo=self.session.host_name or "",
            esmtp=self.session.extended_smtp,
            secure=self.secure,
            tls=describe(self.transport) if self.secure else None,
            authenticated=self.authenticated,
            submission=self.listener.mode == "submission",
            arrival=now,
            when=datetime.fromtimestamp(now, tz=UTC).astimezone(),
            login=(login := self._login()),
            senders=self._senders(login) if login is not None else None,
        )

    async def _accept(self, decoder: DataDecoder) -> Reply | str:
        """Judge the received message, store it durably and say what to answer."""
        assert self._mail is not None and self._mail_params is not None
        config = self.front.config
        prepared = prepare_message(
            decoder,
            queue_id=self._queue_id,
            mail_from=self._mail.address,
            params=self._mail_params,
            recipients=tuple(self._rcpts),
            arrival=self._arrival(),
            hostname=config.hostname,
            max_hops=config.limits.max_hops,
            new_token=lambda: secrets.token_hex(4),
        )
        if isinstance(prepared, Refused):
            metrics.REJECTED.labels(prepared.reason).inc()
            log.info(
                "%s: %s", self._queue_id, prepared.log, extra=self._refusal(prepared.reason, prepared.reply)
            )
            return prepared.reply
        return await self._store(prepared)

    async def _store(self, prepared: Prepared) -> Reply | str:
        """Store (relay.front.Front.store, the one store path of every door), then hold the 250
        while the flow gate is shut."""
        reply = await self.front.store(prepared, self.listener.name)
        if reply.code != 250:
            return reply
        if self.front.intake_gate is not None:
            await self.front.intake_gate()  # in-flow control: at most a second, mail is safe
        return reply
