"""Recipient verification for accepted domains (no backscatter): whether a recipient the relay
would accept exists, decided before ``250`` at RCPT instead of accepted and bounced later.

A `RecipientCheckConfig` covers some domains (``recipientChecks[].domains``, domain patterns;
the first check whose patterns match the recipient's domain applies, recipients of other
domains are not checked). Its valid recipients are addresses or patterns
(relay.core.addresses.address_matches, the one mailbox matcher) inline and from its file. A
listed recipient (and ``postmaster``, RFC 5321 4.5.1) is valid; an unlisted one is ``550
5.1.1``, unless the check has a callout: then the next hop's answer to ``RCPT`` decides
(`callout_reply`: 2xx valid, 5xx ``550 5.1.1``, anything else, a timeout or no connection
``450 4.1.1``, as Postfix's ``reject_unverified_recipient``).

Called by relay.recipient_verify (which reads the files, runs and caches callouts). Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from relay.config import RecipientCheckConfig
from relay.core import status
from relay.core.addresses import address_matches, domain_matches, domain_of
from relay.core.status import Reply

Verdict = Literal["valid", "unknown", "callout", "unchecked"]


def check_for(address: str, checks: Sequence[RecipientCheckConfig]) -> int | None:
    """The index of the check that covers `address`'s domain, None when none does."""
    domain = domain_of(address)
    if not domain:
        return None
    for index, check in enumerate(checks):
        if any(domain_matches(domain, pattern) for pattern in check.domains):
            return index
    return None


def parse_recipients_file(text: str) -> tuple[str, ...]:
    """One address or pattern a line; blank lines and ``#`` comments ignored."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            entries.append(line)
    return tuple(entries)


def static_verdict(address: str, check: RecipientCheckConfig, from_file: Sequence[str]) -> Verdict:
    """What the lists say about `address` (covered by `check`). ``postmaster`` of a covered
    domain is always valid (RFC 5321 4.5.1: a server MUST accept it)."""
    if address_matches(address, "postmaster@*"):
        return "valid"
    if any(address_matches(address, pattern) for pattern in (*check.recipients, *from_file)):
        return "valid"
    return "callout" if check.callout is not None else "unknown"


def callout_reply(code: int | None) -> Reply | None:
    """The reply for the next hop's answer to the callout's RCPT (None: no answer); None
    accepts the recipient."""
    if code is not None and 200 <= code < 300:
        return None
    if code is not None and 500 <= code < 600:
        return status.UNKNOWN_RECIPIENT
    return status.VERIFY_UNAVAILABLE
