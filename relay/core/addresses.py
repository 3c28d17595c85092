"""Envelope address parsing: split a mailbox into local part and domain, judge its real
destination and decide relay permission (no open relay). Pure functions, RFC 5321 4.1.2
grammar; no DNS, no I/O. Called by relay.core.rcpt (the RCPT decision), relay.core.routing
and the adapters that parse addresses (front_session, hops, the gateways).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass


def split_address(address: str) -> tuple[str, str]:
    """(local part, domain) of ``local@domain``; the domain is lower-cased. The split is on the
    last ``@`` outside a quoted local part. Raises ValueError when there is no domain."""
    in_quotes = False
    escaped = False
    at = -1
    for index, char in enumerate(address):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "@" and not in_quotes:
            at = index
    if at <= 0 or at == len(address) - 1:
        raise ValueError(f"not a mailbox: {address!r}")
    return address[:at], address[at + 1 :].lower().rstrip(".")


def domain_of(address: str) -> str:
    """The domain of a mailbox, lower-cased; '' for the null path or a bare local part."""
    try:
        return split_address(address)[1]
    except ValueError:
        return ""


def domain_matches(domain: str, pattern: str) -> bool:
    """Pattern forms from the CRD contract: ``name``, ``*.name`` (strict subdomains) or ``*``."""
    domain = domain.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def address_matches(address: str, pattern: str) -> bool:
    """Mailbox patterns (a user's allowed senders): ``local@<domain pattern>`` with the local
    part exact (case-insensitive, as Postfix's lookups) or ``*`` (any), and the domain judged by
    `domain_matches` (``name``, ``*.name``, ``*``). The null path and a pattern without ``@``
    (other than ``*``) match nothing but themselves; ``*`` alone matches every mailbox."""
    if pattern == "*":
        return bool(address)
    try:
        local, domain = split_address(address)
        want_local, want_domain = pattern.rsplit("@", 1)
    except ValueError:
        return False
    if want_local != "*" and dequote_local_part(local).lower() != want_local.lower():
        return False
    return domain_matches(domain, want_domain.lower().rstrip("."))


# --------------------------------------------------------------------------- relay permission
#
# Who may use this relay to reach a recipient (RFC 5321 3.6.1, RFC 5068 section 3): a client in a
# trusted network, an authenticated client, or anyone when the recipient's *real* destination is
# one of our accept domains. The real destination is what a later hop would make of the address:
# a local part that still carries a routing character (``u%victim@ours``, ``victim!u@ours``,
# ``"u@victim"@ours``) would be relayed on by a lenient next hop, so an untrusted client may not
# use one. Source routes (``@a,@b:u@c``) are stripped by the syntax check before this point (RFC
# 5321 4.1.1.3 / Appendix C: a server SHOULD ignore them), so the mailbox judged is ``u@c``.

ROUTING_CHARACTERS = frozenset("@%!")


def dequote_local_part(local: str) -> str:
    """The local part as a string: ``"a\\"b"`` becomes ``a"b``; a dot-string is unchanged."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        out = []
        escaped = False
        for char in local[1:-1]:
            if escaped:
                out.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            else:
                out.append(char)
        return "".join(out)
    return local


def has_routing_characters(local: str) -> bool:
    """Whether a local part (quoted or not) would route on: it contains ``@``, ``%`` or ``!``."""
    return any(char in ROUTING_CHARACTERS for char in dequote_local_part(local))


def postmaster_address(hostname: str, accept_domains: Sequence[str]) -> str:
    """The mailbox ``RCPT TO:<postmaster>`` (no domain) stands for. RFC 5321 4.5.1: a server
    MUST accept it. The relay has no mailbox of its own, so it becomes ``postmaster@`` the first
    accept domain that is a plain name (the mail domain this relay receives for, routed like any
    other recipient of that domain), else ``postmaster@<hostname>``."""
    for pattern in accept_domains:
        if pattern and "*" not in pattern:
            return f"postmaster@{pattern.lower().rstrip('.')}"
    return f"postmaster@{hostname.lower().rstrip('.')}"


def is_address_literal(domain: str) -> bool:
    return domain.startswith("[")


def accept_domain_matches(domain: str, accept_domains: Sequence[str]) -> bool:
    """Whether a recipient domain is one we accept mail for from anyone.

    The pattern ``*`` is never honoured here: it would make an open relay (log it at start-up).
    Address literals never match a domain pattern.
    """
    if not domain or is_address_literal(domain):
        return False
    return any(pattern != "*" and domain_matches(domain, pattern) for pattern in accept_domains)


def client_is_trusted(
    client_ip: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether the client address lies in one of the trusted networks (IPv4-mapped IPv6 too)."""
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


@dataclass(frozen=True)
class RelayDecision:
    """Whether a recipient may be accepted, and why (the reason is a metric label)."""

    allowed: bool
    reason: str  # trusted | authenticated | accept_domain | relay_denied | routing_characters


def relay_permission(
    local: str,
    domain: str,
    *,
    trusted: bool,
    authenticated: bool,
    accept_domains: Sequence[str],
) -> RelayDecision:
    """Decide relay permission for one recipient mailbox ``local@domain`` (already parsed)."""
    if trusted:
        return RelayDecision(True, "trusted")
    if authenticated:
        return RelayDecision(True, "authenticated")
    if not accept_domain_matches(domain, accept_domains):
        return RelayDecision(False, "relay_denied")
    if has_routing_characters(local):
        return RelayDecision(False, "routing_characters")
    return RelayDecision(True, "accept_domain")
