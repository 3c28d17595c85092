"""The maildir gateway: final delivery into a Maildir (see relay.gateways)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from relay import durable
from relay.config import MaildirGateway
from relay.core.addresses import split_address
from relay.core.model import DeliveryRequest, Recipient, RecipientOutcome
from relay.core.outcome import deferred, delivered

log = logging.getLogger(__name__)


_counter_lock = threading.Lock()
_counter = 0


def _unique_name(hostname: str) -> str:
    """A Maildir file name in `mailbox.Maildir`'s form: ``time.MusecPpidQn.host``."""
    global _counter
    with _counter_lock:
        _counter += 1
        count = _counter
    now = time.time()
    host = hostname.replace("/", r"\057").replace(":", r"\072")
    return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{count}.{host}"


def folder_name(part: str) -> str:
    """A path component for a domain or local part: '/', '%', NUL and control characters are
    percent-encoded, and so is a leading '.' (no '.', '..' or hidden folders)."""
    out: list[str] = []
    for index, char in enumerate(part):
        if char in "/\\%" or not char.isprintable() or (index == 0 and char == "."):
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out) or "%00"


def maildir_for(config: MaildirGateway, address: str) -> Path:
    """Where a recipient's copy goes."""
    root = Path(config.path)
    if config.layout == "single":
        return root
    try:
        local, domain = split_address(address)
    except ValueError:
        local, domain = address, "localhost"
    return root / folder_name(domain) / folder_name(local)


def maildir_copy(content: bytes, mail_from: str, recipient: str) -> bytes:
    """The stored copy: Return-Path and Delivered-To prepended, LF line endings."""
    prefix = f"Return-Path: <{mail_from}>\r\nDelivered-To: {recipient}\r\n".encode()
    return (prefix + content).replace(b"\r\n", b"\n")


def _ensure_maildir(folder: Path) -> None:
    if all((folder / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return
    created = not folder.exists()
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    durable.fsync_dir(folder)
    if created:
        durable.fsync_dir(folder.parent)


def write_maildir(folder: Path, data: bytes, hostname: str) -> Path:
    """Store one message atomically (tmp, fsync, rename into new, fsync new). Raises OSError."""
    _ensure_maildir(folder)
    name = _unique_name(hostname)
    tmp = folder / "tmp" / name
    final = folder / "new" / name
    durable.commit(tmp, data, (final,), fsync_before_rename=True, fsync_after_rename=False)
    durable.fsync_dir(final.parent)
    return final


def _maildir_failure(recipient: Recipient, exc: OSError) -> RecipientOutcome:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return deferred(recipient, "4.3.1", f"maildir full: {reason}", code=452)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return deferred(recipient, "4.3.0", f"maildir not writable: {reason}")
    return deferred(recipient, "4.3.0", f"maildir write failed: {reason}")


class MaildirTransport:
    """Final delivery into Maildirs; one copy per recipient."""

    def __init__(self, config: MaildirGateway, *, hostname: str) -> None:
        self.config = config
        self.hostname = hostname

    def _deliver_one(self, request: DeliveryRequest, recipient: Recipient) -> RecipientOutcome:
        folder = maildir_for(self.config, recipient.address)
        data = maildir_copy(
            request.message.content, request.message.entry.envelope.mail_from, recipient.address
        )
        try:
            stored = self.write(folder, data)
        except OSError as exc:
            log.warning(
                "[%s] maildir delivery to %s deferred: %s", request.message.entry.queue_id, folder, exc
            )
            return _maildir_failure(recipient, exc)
        return delivered(recipient, f"delivered to maildir {stored}")

    def write(self, folder: Path, data: bytes) -> Path:
        """The one place that touches the disk (tests may wrap it to inject an OSError)."""
        return write_maildir(folder, data, self.hostname)

    def _deliver_all(self, request: DeliveryRequest) -> list[RecipientOutcome]:
        return [self._deliver_one(request, r) for r in request.recipients]

    async def deliver(self, request: DeliveryRequest) -> Sequence[RecipientOutcome]:
        return await asyncio.to_thread(self._deliver_all, request)

    async def close(self) -> None:
        return None
