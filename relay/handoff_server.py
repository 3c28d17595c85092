"""The handoff listener (issue 14): takes queued mail from a draining peer of the same relay.

Bound on ``handoff.host:handoff.port`` by relay.front when ``handoff`` is configured, one
`HandoffSession` per connection on the machinery of relay.smtpd (slot, idle timer, command
loop, replies). It is not a mail listener: nothing is relayed for anyone.

- Only a peer with the relay's shared secret may use it: ``AUTH PLAIN`` whose password equals
  the one line of ``handoff.credentialFile`` (compared with `hmac.compare_digest`; the user name
  is not checked). Anything else is refused: MAIL before AUTH ``530 5.7.0``, a wrong secret
  ``535 5.7.8`` (``auth.maxFailures``-like cut-off after 3: ``421 4.7.0``), each counted in
  ``mailrelay_handoff_refused_total{reason}``. AUTH is offered without TLS: the port is meant
  for the pod network between peers (a NetworkPolicy can keep everyone else off it).
- A transaction must carry the queue entry (``XQUEUE``, relay.core.handoff); its sender and
  recipients must match it. The content is stored as sent: no ``Received:`` header, no hop
  count, no routing decision (the message was accepted once already).
- The message is stored with its queue state (`Spool.adopt`: held ones in hold/, ones due
  later in deferred/, the rest in incoming/ and the scheduler told) before the ``250``. A queue
  id this spool already holds (a hand-off repeated after a crash) is answered 250 and kept once,
  counted in ``mailrelay_handoff_duplicates_total``.
- A draining relay takes no hand-offs (``421 4.3.2``, as for any new session), so two draining
  peers never pass mail back and forth.

What it must not do: accept a message it has not made durable, or accept mail from anyone
without the secret.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from relay import metrics
from relay.config import ListenerConfig
from relay.core import handoff, sasl, status
from relay.core.model import QueueEntry, Recipient
from relay.core.smtp_data import DataDecoder
from relay.core.smtp_syntax import CommandError, parse_mail_params, parse_path, parse_rcpt_params, valid_helo
from relay.smtpd import SmtpdSession
from relay.spool import SpoolError, SpoolFullError

if TYPE_CHECKING:
    from relay.front import Front

log = logging.getLogger("relay.handoff")

MAX_LINE = 4 * 1024 * 1024  # the MAIL line carries the queue entry (results of every recipient)
MAX_AUTH_FAILURES = 3
CREDENTIAL_UNAVAILABLE = status.Reply(454, "4.7.0", "Hand-off credential not available")
NOT_HERE = status.Reply(502, "5.5.1", "Not available on the handoff listener")


def read_credential(path: Path) -> str:
    """The shared secret: the file's first line, surrounding whitespace removed (blocking)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def handoff_listener(host: str, port: int) -> ListenerConfig:
    """The handoff listener as the front's session machinery sees it (name ``handoff``)."""
    return ListenerConfig(name="handoff", host=host, port=port, mode="relay", tls="none", auth="none")


class HandoffSession(SmtpdSession):
    """One connection from a draining peer."""

    def __init__(self, front: Front, listener: ListenerConfig) -> None:
        self._peer_ok = False
        self._auth_failures = 0
        self._entry: QueueEntry | None = None
        self._mail_from: str | None = None
        self._rcpts: list[Recipient] = []
        self._in_data = False
        super().__init__(front, listener)

    # ------------------------------------------------------------------ session machinery

    def _max_command_line(self) -> int:
        return MAX_LINE

    def _data_decoder(self) -> DataDecoder:
        # what the peer stored, plus the trace headers its hops added; lines as stored
        return DataDecoder(self.front.config.limits.max_message_size + (1 << 20), max_line=MAX_LINE)

    @property
    def in_transaction(self) -> bool:
        return self._entry is not None or self._in_data

    def _reset(self) -> None:
        self._entry = None
        self._mail_from = None
        self._rcpts = []

    def _tag(self) -> str:
        return f"handoff {self.client_ip}"

    # ------------------------------------------------------------------ commands

    async def smtp_EHLO(self, arg: str | None) -> None:
        if not arg or not valid_helo(arg):
            await self.reply(status.BAD_ARGUMENTS.with_text("Syntax: EHLO hostname"))
            return
        assert self.session is not None
        self.session.host_name = arg
        self.session.extended_smtp = True
        self._reset()
        limits = self.front.config.limits
        keywords = [
            f"SIZE {limits.max_message_size + (1 << 20)}",
            "8BITMIME",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
            "AUTH PLAIN",
        ]
        lines = [f"250-{self.hostname}"] + [f"250-{k}" for k in keywords[:-1]] + [f"250 {keywords[-1]}"]
        await self._write_raw(lines)

    async def smtp_HELO(self, arg: str | None) -> None:
        await self.reply(status.NOT_IMPLEMENTED.with_text("Use EHLO"))

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.reply(status.OK)

    async def smtp_RSET(self, arg: str | None) -> None:
        self._reset()
        await self.reply(status.OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self.reply(status.BYE)
        self._close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.reply(NOT_HERE)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.reply(NOT_HERE)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.reply(NOT_HERE)

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        await self.reply(NOT_HERE)

    async def smtp_AUTH(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self.reply(status.NEED_HELO.with_text("Send EHLO first"))
            return
        if self._peer_ok:
            await self.reply(status.AUTH_ALREADY)
            return
        exchange = sasl.start(arg)
        if isinstance(exchange, status.Reply):
            await self.reply(exchange)
            return
        step = exchange.first()
        while isinstance(step, sasl.Challenge):
            await self.push(step.line)
            line = await self._reader.readline()
            if not line:
                self._close()
                return
            step = exchange.answer(line)
        if isinstance(step, status.Reply):
            await self.reply(step)
            return
        handoff_config = self.front.config.handoff
        try:
            if handoff_config is None:
                raise OSError("no handoff configured")
            secret = await asyncio.to_thread(read_credential, handoff_config.credential_file)
        except OSError as exc:
            log.error("hand-off credential cannot be read: %s", exc)
            await self.reply(CREDENTIAL_UNAVAILABLE)
            return
        given = step.password.encode("utf-8", "surrogateescape")
        if secret and hmac.compare_digest(given, secret.encode("utf-8")):
            self._peer_ok = True
            log.info("%s: peer authenticated", self._tag())
            await self.reply(status.AUTH_OK)
            return
        self._auth_failures += 1
        metrics.HANDOFF_REFUSED.labels("auth").inc()
        log.warning("%s: wrong hand-off credential (%d)", self._tag(), self._auth_failures)
        await asyncio.sleep(min(0.5 * self._auth_failures, 2.0))
        if self._auth_failures >= MAX_AUTH_FAILURES:
            await self.reply(status.TOO_MANY_AUTH_FAILURES)
            self._close()
            return
        await self.reply(status.AUTH_FAILED)

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self.reply(status.NEED_HELO)
            return
        if not self._peer_ok:
            metrics.HANDOFF_REFUSED.labels("auth_required").inc()
            log.info("%s: MAIL without the hand-off credential refused", self._tag())
            await self.reply(status.AUTH_REQUIRED)
            return
        if self._entry is not None:
            await self.reply(status.NESTED_MAIL)
            return
        try:
            path = parse_path(arg, "FROM:", utf8=True, null_allowed=True)
            entry_value: str | None = None
            others = []
            for keyword, value in path.params:
                if keyword == handoff.PARAMETER:
                    entry_value = value
                else:
                    others.append((keyword, value))
            params = parse_mail_params(others, self.front.config.limits.max_message_size + (1 << 20))
        except CommandError as exc:
            await self.reply(exc.reply)
            return
        if entry_value is None:
            await self.reply(handoff.NEED_ENTRY)
            return
        try:
            entry = handoff.decode_entry(entry_value)
        except ValueError as exc:
            log.info("%s: %s", self._tag(), exc)
            await self.reply(handoff.BAD_ENTRY)
            return
        if not params.smtputf8 and not path.address.isascii():
            await self.reply(status.NO_SMTPUTF8)
            return
        self._entry = entry
        self._mail_from = path.address
        await self.reply(status.SENDER_OK)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if self._entry is None:
            await self.reply(status.NEED_MAIL)
            return
        try:
            path = parse_path(arg, "TO:", utf8=True, null_allowed=False)
            params = parse_rcpt_params(path.params)
        except CommandError as exc:
            await self.reply(exc.reply)
            return
        self._rcpts.append(Recipient(address=path.address, notify=params.notify, orcpt=params.orcpt))
        await self.reply(status.RECIPIENT_OK)

    async def smtp_DATA(self, arg: str | None) -> None:
        entry = self._entry
        if entry is None or self._mail_from is None:
            await self.reply(status.NEED_MAIL)
            return
        if not self._rcpts:
            await self.reply(status.NEED_RCPT)
            return
        self._in_data = True
        try:
            await self._write_raw([status.START_DATA])
            decoder = await self._read_data()
            if decoder is None:
                return
            reply = await self._store(entry, self._mail_from, decoder)
        finally:
            self._in_data = False
            self._reset()
        await self.reply(reply)

    async def _store(self, entry: QueueEntry, mail_from: str, decoder: DataDecoder) -> status.Reply:
        if decoder.problem is not None:
            return decoder.problem
        mismatch = handoff.check_transaction(entry, mail_from, self._rcpts)
        if mismatch is not None:
            log.warning("%s: %s: envelope does not match the queue entry", self._tag(), entry.queue_id)
            return mismatch
        front = self.front
        try:
            state = await front.spool.adopt(entry, decoder.content(), now=front.clock())
        except SpoolError as exc:
            log.error("%s: %s not stored: %s", self._tag(), entry.queue_id, exc)
            return status.SPOOL_FULL if isinstance(exc, SpoolFullError) else status.SPOOL_ERROR
        if state is None:
            metrics.HANDOFF_DUPLICATES.inc()
            log.info("%s: already queued here (a repeated hand-off), kept once", entry.queue_id)
            return status.QUEUED.with_text(f"Ok: already queued as {entry.queue_id}")
        metrics.HANDOFF.labels("received").inc()
        log.info(
            "%s: taken over from %s into %s: nrcpt=%d attempts=%d from=<%s>",
            entry.queue_id,
            self.client_ip,
            state,
            len(entry.pending),
            entry.attempts,
            mail_from,
        )
        if state == "incoming" and front.on_stored is not None:
            try:
                front.on_stored(entry.queue_id)
            except Exception:
                log.exception("%s: scheduler notification failed", entry.queue_id)
        return status.QUEUED.with_text(f"Ok: queued as {entry.queue_id}")
