"""The sending side of the hand-off (issue 14): a draining relay gives what it cannot deliver now
to a remaining peer of the same relay; `mailrelay drain` does the same for an orphaned spool.

`HandoffClient` speaks to a peer's handoff listener (relay.handoff_server) with the project's
own pipelining SMTP client (relay.smtp_client) and the pure transaction steps of
relay.smtp_transaction: connect, EHLO, ``AUTH PLAIN`` with the shared secret (user
``handoff``), then per message one transaction whose MAIL carries the queue entry (``XQUEUE``,
relay.core.handoff) besides the usual SIZE/BODY/SMTPUTF8/RET/ENVID, and one RCPT per pending
recipient with NOTIFY and ORCPT. One connection per peer, reused.

`Drainer` is the loop: it lists the spool states it was given (a draining relay: deferred/ and
hold/; its scheduler keeps delivering incoming/ and due mail, and whatever it defers is handed
off on the next pass; `mailrelay drain`: incoming/ too), claims each message (the spool's
atomic rename into active/, so a scheduler never delivers it at the same time; a held message
is read where it is), sends it to a peer and removes the local copy only after the peer's
``250``. A peer that cannot be reached or refuses the session is skipped for this pass (the
next peer is tried); a message the peer refuses goes back where it was and is counted as
failed. A crash on either side loses nothing: before the 250 the message is still here (in
active/, recovered into incoming/ on the next start), after it the peer has it; at worst both
have it, and the peer keeps a queue id it already holds once (``mailrelay_handoff_duplicates``).

What it must not do: remove a message the peer has not answered 250 for, or add anything to a
message (no Received header, no hop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay import metrics
from relay.config import HandoffPeer
from relay.core import handoff
from relay.core.model import DeliveryRequest, Disposition, Message, Recipient
from relay.delivery import send_prepared
from relay.handoff_server import read_credential
from relay.smtp_client import SmtpConnection, SmtpError, SmtpReplyError
from relay.smtp_transaction import Prepared, Verdict, prepare
from relay.spool import CorruptEntryError, Spool, SpoolError

log = logging.getLogger("relay.handoff")


class PeerUnavailable(Exception):
    """The peer cannot take hand-offs now (unreachable, draining, credential refused)."""


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30.0
    command: float = 300.0
    data: float = 600.0  # RFC 5321 4.5.3.2.6: a repeated hand-off is a duplicate, so wait


class HandoffClient:
    """Hands messages to peers; one open session per peer."""

    def __init__(self, hostname: str, credential_file: Path, timeouts: Timeouts = Timeouts()) -> None:
        self.hostname = hostname
        self.credential_file = credential_file
        self.timeouts = timeouts
        self._sessions: dict[tuple[str, int], SmtpConnection] = {}

    async def _session(self, peer: HandoffPeer) -> tuple[SmtpConnection, bool]:
        """An authenticated session with `peer`, and whether it was open already (reused)."""
        key = (peer.host, peer.port)
        smtp = self._sessions.get(key)
        if smtp is not None and smtp.is_connected:
            return smtp, True
        self._sessions.pop(key, None)
        try:
            secret = await asyncio.to_thread(read_credential, self.credential_file)
        except OSError as exc:
            raise PeerUnavailable(f"cannot read the hand-off credential: {exc}") from exc
        try:
            smtp = await SmtpConnection.open(peer.host, peer.port, timeout=self.timeouts.connect)
        except SmtpError as exc:
            raise PeerUnavailable(f"{peer.host}:{peer.port}: {exc}") from exc
        try:
            await smtp.hello(self.hostname, self.timeouts.command)
            await smtp.authenticate(handoff.USER, secret, self.timeouts.command)
        except SmtpReplyError as exc:
            smtp.abort()
            raise PeerUnavailable(f"{peer.host}:{peer.port} refused the session: {exc.reply}") from exc
        except SmtpError as exc:
            smtp.abort()
            raise PeerUnavailable(f"{peer.host}:{peer.port}: {exc}") from exc
        self._sessions[key] = smtp
        return smtp, False

    async def send(self, peer: HandoffPeer, message: Message, *, held: bool = False) -> str | None:
        """Hand `message` to `peer`: None once the peer answered 250 for it, else why the peer
        refused this message. Raises PeerUnavailable when the peer takes nothing now. A kept
        session that turns out closed before MAIL (the peer's idle timeout) is replaced once."""
        entry = message.entry.with_changes(held=held)
        label = f"{peer.host}:{peer.port}"
        request = DeliveryRequest(Message(entry, message.content), entry.pending)
        extra = (f"{handoff.PARAMETER}={handoff.encode_entry(entry)}".encode("ascii"),)
        while True:
            smtp, reused = await self._session(peer)
            prepared = prepare(request, smtp.supports, label=label, remote=peer.host, extra_mail=extra)
            if not isinstance(prepared, Prepared):  # cannot happen with our listener's extensions
                return f"{label} cannot take this message"
            verdict = await self._transaction(smtp, prepared, entry.pending, peer)
            if not (reused and verdict.error is not None and verdict.error.before_mail):
                break
            log.info("kept hand-off session to %s went stale; reconnecting", label)
        outcomes = [verdict.results.get(i) for i in range(len(entry.pending))]
        if all(o is not None and o.disposition is Disposition.DELIVERED for o in outcomes):
            return None
        error = verdict.error
        if error is not None and (error.broken or error.code == 421):
            raise PeerUnavailable(f"{label}: {error.text}")
        refused = next(
            (o for o in outcomes if o is not None and o.disposition is not Disposition.DELIVERED), None
        )
        if refused is not None:
            return f"{label} answered {refused.code} {refused.status} {refused.text}"
        return f"{label}: {error.text if error else 'no reply'}"

    async def _transaction(
        self, smtp: SmtpConnection, prepared: Prepared, pending: tuple[Recipient, ...], peer: HandoffPeer
    ) -> Verdict:
        """Send one prepared transaction and read what became of it; a session unfit for the
        next one is closed."""
        verdict = await send_prepared(
            smtp,
            prepared,
            pending,
            command_timeout=self.timeouts.command,
            data_timeout=self.timeouts.data,
            remote=peer.host,
        )
        if verdict.after != "reuse":
            if verdict.after == "rset" and smtp.is_connected:
                with contextlib.suppress(SmtpError):
                    await smtp.rset(self.timeouts.command)
            else:
                smtp.abort()
                self._sessions.pop((peer.host, peer.port), None)
        return verdict

    async def close(self) -> None:
        for smtp in list(self._sessions.values()):
            with contextlib.suppress(SmtpError, OSError):
                await smtp.quit(5.0)
        self._sessions.clear()


@dataclass
class DrainStats:
    handed_off: int = 0
    failed: int = 0  # hand-offs a peer refused (the message stays here)
    unreachable: bool = False  # the last pass found no peer to take mail


class Drainer:
    """Hands the messages in `states` of `spool` to `peers()`, pass after pass."""

    def __init__(
        self,
        spool: Spool,
        peers: Callable[[], Sequence[HandoffPeer]],
        client: HandoffClient,
        *,
        states: Sequence[str] = ("deferred", "hold"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.peers = peers
        self.client = client
        self.states = tuple(states)
        self.clock = clock
        self.stats = DrainStats()
        self._next_peer = 0

    def _listing(self) -> list[tuple[str, str]]:
        return [(state, queue_id) for state in self.states for queue_id in self.spool.ids(state)]

    async def _take(self, state: str, queue_id: str) -> Message | None:
        if state == "hold":
            return await self.spool.read_held(queue_id)
        if state == "deferred":
            return await self.spool.claim_deferred(queue_id)
        return await self.spool.claim(queue_id)

    async def _put_back(self, state: str, message: Message) -> None:
        if state == "hold":
            return  # never moved
        due = message.entry.next_attempt if state == "deferred" else self.clock()
        await self.spool.requeue_unchanged(message.entry.queue_id, due)

    async def pass_once(self) -> int:
        """One pass over the spool; returns how many messages were handed off."""
        peers = list(self.peers())
        if not peers:
            self.stats.unreachable = True
            return 0
        listing = await asyncio.to_thread(self._listing)
        down: set[int] = set()
        sent = 0
        for state, queue_id in listing:
            if len(down) == len(peers):
                break
            try:
                message = await self._take(state, queue_id)
            except CorruptEntryError as exc:
                log.error("[%s] %s", queue_id, exc)
                continue
            except (SpoolError, OSError) as exc:
                log.error("[%s] cannot take it for the hand-off: %s", queue_id, exc)
                continue
            if message is None:
                continue  # a scheduler or an operator took it
            if await self._hand(state, message, peers, down):
                sent += 1
        self.stats.unreachable = len(down) == len(peers)
        return sent

    async def _hand(self, state: str, message: Message, peers: list[HandoffPeer], down: set[int]) -> bool:
        queue_id = message.entry.queue_id
        for _ in range(len(peers)):
            index = self._next_peer % len(peers)
            self._next_peer += 1
            if index in down:
                continue
            peer = peers[index]
            try:
                refusal = await self.client.send(peer, message, held=state == "hold")
            except PeerUnavailable as exc:
                log.warning("hand-off peer %s:%d unavailable: %s", peer.host, peer.port, exc)
                down.add(index)
                continue
            except BaseException:  # cancelled (the drain stopped) or a bug: the message goes back
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._put_back(state, message))
                raise
            if refusal is None:
                await self.spool.remove("hold" if state == "hold" else "active", queue_id)
                self.stats.handed_off += 1
                metrics.HANDOFF.labels("sent").inc()
                log.info("[%s] handed off to %s:%d (%s)", queue_id, peer.host, peer.port, state)
                return True
            log.error("[%s] hand-off refused: %s; it stays here", queue_id, refusal)
            self.stats.failed += 1
            metrics.HANDOFF.labels("failed").inc()
            break
        await self._put_back(state, message)
        return False

    async def run(self, interval: float = 1.0, unreachable_interval: float = 5.0) -> None:
        """Pass after pass until cancelled (the pod left ``drain.pods`` or shuts down); while no
        peer can be reached, passes come every `unreachable_interval` seconds."""
        try:
            while True:
                try:
                    await self.pass_once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("hand-off pass failed")
                await asyncio.sleep(unreachable_interval if self.stats.unreachable else interval)
        finally:
            await self.client.close()
