"""Senders bound to logins (Postfix's ``reject_sender_login_mismatch``): which envelope senders
and ``From:`` header addresses an authenticated user may use.

A user entry of the users file may list ``senders`` (mailbox patterns,
relay.core.addresses.address_matches: ``alice@example.com``, ``*@team.example.com``,
``*@*.example.com``). A session authenticated as that user then gets ``553 5.7.1`` for a
``MAIL FROM`` outside the list (the null sender included: a user does not send bounces) and,
after the final dot, for a message whose ``From:`` names an address outside it (every address
of every ``From:`` field; a ``From:`` that names no address passes the envelope check alone).
A user without ``senders`` is not restricted, as with Postfix a login absent from
``smtpd_sender_login_maps``.

Called by relay.front_session (MAIL) and relay.core.accept (the header check). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.utils import getaddresses

from relay.core.addresses import address_matches
from relay.core.headers import header_section
from relay.core.status import Reply


def sender_allowed(address: str, senders: Sequence[str] | None) -> bool:
    """Whether a user whose entry lists `senders` (None: no list) may send as `address`."""
    if senders is None:
        return True
    return any(address_matches(address, pattern) for pattern in senders)


def not_owned(address: str, user: str) -> Reply:
    return Reply(553, "5.7.1", f"<{address}>: Sender address rejected: not owned by user {user}")


def from_addresses(content: bytes) -> list[str]:
    """Every address in the ``From:`` fields of a message's header section (unfolded)."""
    values: list[str] = []
    in_from = False
    for raw in header_section(content).split(b"\n"):
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if line[:1] in (" ", "\t"):
            if in_from:
                values[-1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        in_from = bool(colon) and name.strip().lower() == "from"
        if in_from:
            values.append(value)
    return [address for _name, address in getaddresses(values) if address]


def foreign_from(content: bytes, senders: Sequence[str] | None) -> str | None:
    """The first ``From:`` address the user may not use, if any."""
    if senders is None:
        return None
    for address in from_addresses(content):
        if not sender_allowed(address, senders):
            return address
    return None
