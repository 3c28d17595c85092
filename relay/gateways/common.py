"""What every gateway transport shares: outcome builders, diagnostic text, sysexits codes.

Pure helpers; no I/O. The transports are in the sibling modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from relay.core.model import (
    Disposition,
    Recipient,
    RecipientOutcome,
)

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75  # sysexits.h: temporary failure, the caller should retry
DIAGNOSTIC_LIMIT = 400  # characters of stderr / HTTP body kept in a diagnostic


def recipient_outcome(
    recipient: Recipient,
    disposition: Disposition,
    code: int,
    status: str,
    text: str,
    *,
    remote: str | None = None,
    relayed: bool = False,
) -> RecipientOutcome:
    return RecipientOutcome(
        recipient=recipient,
        disposition=disposition,
        code=code,
        status=status,
        text=text,
        remote_mta=remote,
        relayed=relayed,
    )


def all_outcomes(
    recipients: Sequence[Recipient],
    disposition: Disposition,
    code: int,
    status: str,
    text: str,
    *,
    remote: str | None = None,
    relayed: bool = False,
) -> list[RecipientOutcome]:
    return [
        recipient_outcome(r, disposition, code, status, text, remote=remote, relayed=relayed)
        for r in recipients
    ]


def one_line(text: str, limit: int = DIAGNOSTIC_LIMIT) -> str:
    """Collapse whitespace and control characters to single spaces and truncate with '...'."""
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
