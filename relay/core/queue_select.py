"""Which queued messages a bulk ``mailrelay queue`` command acts on (``--sender``,
``--recipient``, ``--older-than``): a pure predicate over a queue entry and the time.

Patterns are shell-style globs matched case-insensitively against the whole address
(``*@example.com``, ``alerts-*@*``); ``<>`` (or an empty pattern) matches the null sender. A
recipient pattern matches when any recipient still pending matches. Every given condition must
hold; a selector with none matches everything (``--all``). Pure: the spool and the clock are the
caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from relay.core.model import QueueEntry


def _matches(pattern: str, address: str) -> bool:
    if pattern in ("", "<>"):
        return address == ""
    return fnmatchcase(address.lower(), pattern.lower())


@dataclass(frozen=True)
class Selector:
    sender: str | None = None
    recipient: str | None = None
    older_than: float | None = None  # seconds since arrival

    @property
    def empty(self) -> bool:
        return self.sender is None and self.recipient is None and self.older_than is None

    def matches(self, entry: QueueEntry, now: float) -> bool:
        if self.sender is not None and not _matches(self.sender, entry.envelope.mail_from):
            return False
        if self.recipient is not None and not any(_matches(self.recipient, r.address) for r in entry.pending):
            return False
        return self.older_than is None or now - entry.arrival >= self.older_than
