"""Recipient verification at RCPT (the adapter): reads each check's recipients file (re-read
when it changes, at most once a second; a file that cannot be read keeps the previous list,
logged), and runs callouts: connect to the next hop, ``EHLO``, ``MAIL FROM:<>``, ``RCPT
TO:<recipient>``, ``QUIT``, no DATA. Callout answers are cached per process (2xx for
``callout.positiveTtl``, 5xx for ``negativeTtl``; a failure to answer is not cached). The rules
are relay.core.recipients'; the front asks `RecipientVerifier.verify` after relay.core.rcpt
accepted a recipient and before it answers 250.

The callout goes to ``callout.host``/``port``, else to the first hop of the recipient's route
when that is another relay (RelayHop); any other route gets ``450 4.1.1`` and an error line
(the check is misconfigured). The callout speaks plain SMTP (no STARTTLS): point it at the
internal next hop, not at the Internet. It decides no reply itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiosmtplib

from relay import metrics
from relay.config import RecipientCheckConfig, RelayConfig, RelayHop, RouteConfig
from relay.core import recipients as rules
from relay.core.status import Reply

log = logging.getLogger("relay.front")


class _ListFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: tuple[str, ...] = ()
        self._stamp: tuple[int, int, float] | None = None
        self._checked = -1.0

    def current(self) -> tuple[str, ...]:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return self.entries
        self._checked = now
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_size, stat.st_mtime)
            if stamp != self._stamp:
                self.entries = rules.parse_recipients_file(self.path.read_text(encoding="utf-8"))
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as exc:
            log.error(
                "recipients file %s unreadable, keeping %d entries: %s", self.path, len(self.entries), exc
            )
        return self.entries


class RecipientVerifier:
    """The front's recipient checks, with their files and the callout cache."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._files: dict[Path, _ListFile] = {}
        self._cache: dict[tuple[str, int, str], tuple[float, int]] = {}

    def _file_entries(self, check: RecipientCheckConfig) -> tuple[str, ...]:
        if check.recipients_file is None:
            return ()
        listed = self._files.get(check.recipients_file)
        if listed is None:
            listed = self._files[check.recipients_file] = _ListFile(check.recipients_file)
        return listed.current()

    async def verify(self, address: str, route: RouteConfig | None, config: RelayConfig) -> Reply | None:
        """None when `address` may be accepted; else the refusal (550 5.1.1 or 450 4.1.1)."""
        checks = config.recipient_checks
        index = rules.check_for(address, checks)
        if index is None:
            return None
        check = checks[index]
        verdict = rules.static_verdict(address, check, self._file_entries(check))
        if verdict == "valid":
            return None
        if verdict == "unknown":
            metrics.RECIPIENT_CHECKS.labels("unknown").inc()
            return rules.callout_reply(550)
        assert check.callout is not None
        target = self._target(check, route)
        if target is None:
            log.error("recipient check for %s: callout has no host and route is not a relay hop", address)
            metrics.RECIPIENT_CHECKS.labels("callout_unavailable").inc()
            return rules.callout_reply(None)
        code = await self._callout(target, address, check, config.hostname)
        reply = rules.callout_reply(code)
        outcome = (
            "callout_valid"
            if reply is None
            else "callout_unknown"
            if code and code >= 500
            else "callout_unavailable"
        )
        metrics.RECIPIENT_CHECKS.labels(outcome).inc()
        return reply

    @staticmethod
    def _target(check: RecipientCheckConfig, route: RouteConfig | None) -> tuple[str, int] | None:
        callout = check.callout
        assert callout is not None
        if callout.host is not None:
            return callout.host, callout.port
        if route is not None and isinstance(route.next_hop, RelayHop):
            return route.next_hop.host, route.next_hop.port
        return None

    async def _callout(
        self, target: tuple[str, int], address: str, check: RecipientCheckConfig, hostname: str
    ) -> int | None:
        callout = check.callout
        assert callout is not None
        key = (target[0], target[1], address.lower())
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached[0]:
            return cached[1]
        code = await probe(target[0], target[1], address, wait=callout.timeout, hostname=hostname)
        if code is not None and 200 <= code < 300:
            self._cache[key] = (now + callout.positive_ttl, code)
        elif code is not None and code >= 500:
            self._cache[key] = (now + callout.negative_ttl, code)
        if len(self._cache) > 100_000:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        log.info("callout %s:%d RCPT <%s>: %s", target[0], target[1], address, code if code else "no answer")
        return code


async def probe(host: str, port: int, address: str, *, wait: float, hostname: str) -> int | None:
    """The next hop's reply code to ``RCPT TO:<address>`` after ``MAIL FROM:<>``; None when it
    could not be asked (connection, timeout, MAIL refused, a broken session)."""
    smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=wait, start_tls=False, local_hostname=hostname)
    try:
        await smtp.connect()
        await smtp.mail("")
        try:
            response = await smtp.rcpt(address)
            code = response.code
        except aiosmtplib.SMTPRecipientRefused as refused:
            code = refused.code
        return code
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        return None
    finally:
        if smtp.is_connected:
            try:
                await asyncio.wait_for(smtp.quit(), wait)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                smtp.close()
