"""Envelope address parsing: split a mailbox into local part and domain, judge its real
destination. Pure functions, RFC 5321 4.1.2 grammar; no DNS, no I/O.
"""

from __future__ import annotations


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
