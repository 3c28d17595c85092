"""The pipe gateway: run a command with the message on stdin (see relay.gateways)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence

from relay.config import PipeGateway
from relay.core.model import DeliveryRequest, Recipient, RecipientOutcome
from relay.core.outcome import bounced, deferred, delivered, for_all
from relay.gateways.common import EX_TEMPFAIL, one_line

log = logging.getLogger(__name__)


_PASSED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
# sysexits.h codes that name the recipient or host, for a better enhanced status (RFC 3463).
_EXIT_STATUS = {67: "5.1.1", 68: "5.1.2"}


def pipe_arguments(command: Sequence[str], sender: str, recipient: str, queue_id: str) -> list[str]:
    """Substitute the placeholders; nothing else in an argument is interpreted (no shell)."""
    return [
        arg.replace("{sender}", sender).replace("{recipient}", recipient).replace("{queue_id}", queue_id)
        for arg in command
    ]


class PipeTransport:
    """Runs the configured command for each request (or each recipient with ``{recipient}``)."""

    def __init__(self, config: PipeGateway) -> None:
        self.config = config
        self.per_recipient = any("{recipient}" in arg for arg in config.command)

    async def deliver(self, request: DeliveryRequest) -> Sequence[RecipientOutcome]:
        if self.per_recipient:
            outcomes: list[RecipientOutcome] = []
            for recipient in request.recipients:
                outcomes.extend(await self._run(request, (recipient,)))
            return outcomes
        return await self._run(request, request.recipients)

    def _environment(self, request: DeliveryRequest, recipients: Sequence[Recipient]) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASSED_ENVIRONMENT if k in os.environ}
        env.setdefault("PATH", os.defpath)
        entry = request.message.entry
        env["MAILRELAY_SENDER"] = entry.envelope.mail_from
        env["MAILRELAY_RECIPIENTS"] = ",".join(r.address for r in recipients)
        env["MAILRELAY_QUEUE_ID"] = entry.queue_id
        env["MAILRELAY_SIZE"] = str(len(request.message.content))
        if self.per_recipient:
            env["MAILRELAY_RECIPIENT"] = recipients[0].address
        return env

    async def _run(self, request: DeliveryRequest, recipients: Sequence[Recipient]) -> list[RecipientOutcome]:
        entry = request.message.entry
        args = pipe_arguments(
            self.config.command,
            entry.envelope.mail_from,
            recipients[0].address if self.per_recipient else "",
            entry.queue_id,
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self._environment(request, recipients),
                start_new_session=True,  # its own process group, killed as a whole on timeout
            )
        except OSError as exc:
            text = f"cannot run pipe command {args[0]!r}: {exc.strerror or exc}"
            return for_all(recipients, deferred, "4.3.5", text)
        try:
            _, stderr = await asyncio.wait_for(
                process.communicate(request.message.content), timeout=self.config.timeout
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            text = f"pipe command timed out after {self.config.timeout:g}s and was killed"
            return for_all(recipients, deferred, "4.4.7", text)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
        code = process.returncode
        said = one_line(stderr.decode("utf-8", errors="replace"))
        if code == 0:
            return for_all(recipients, delivered, "pipe command exited 0", relayed=True)
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            text = f"pipe command killed by signal {name}"
            return for_all(recipients, deferred, "4.3.0", f"{text}: {said}" if said else text)
        if code == EX_TEMPFAIL:
            text = "pipe command exited 75 (temporary failure)"
            return for_all(recipients, deferred, "4.3.0", f"{text}: {said}" if said else text)
        text = f"pipe command exited {code}"
        status = _EXIT_STATUS.get(code or 0, "5.3.0")
        return for_all(recipients, bounced, status, f"{text}: {said}" if said else text, code=554)

    async def close(self) -> None:
        return None
