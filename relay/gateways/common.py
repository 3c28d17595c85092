"""What every gateway transport shares: diagnostic text and sysexits codes.

Pure helpers; no I/O. The transports are in the sibling modules; they build their outcomes with
relay.core.outcome.
"""

from __future__ import annotations

EX_TEMPFAIL = 75  # sysexits.h: temporary failure, the caller should retry
DIAGNOSTIC_LIMIT = 400  # characters of stderr / HTTP body kept in a diagnostic


def one_line(text: str, limit: int = DIAGNOSTIC_LIMIT) -> str:
    """Collapse whitespace and control characters to single spaces and truncate with '...'."""
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
