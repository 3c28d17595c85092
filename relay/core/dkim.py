"""DKIM signing decisions (RFC 6376): which key signs a message, over which header fields, and
what DNS record publishes a key.

relay.hops asks `plan_signature` once per SMTP hop with the route's keys and the message
content; relay.dkim (the adapter around dkimpy) does the signing with the plan after the last
change to the content (relay.smtp_transaction's 8BITMIME conversion) and before the hop. The
operator and ``mailrelay dkim keygen`` ask `dns_record` what TXT record to publish.

Rules:
- a message is signed only when it has exactly one From header field with exactly one address
  (RFC 5322 3.6.2 allows a list there; we do not guess which author counts) and an *active* key
  of the route has that address's domain exactly (lower-cased): a sub-domain is not covered by
  its parent's key, mail from any other domain is never signed;
- an inactive key (the old one during a rotation) never signs; it is listed so that its DNS
  record stays in the status until it is withdrawn;
- the signed header fields are From first (RFC 6376 5.4 requires it), then each configured name
  that the message carries, in the configured order, each once.

Pure: no I/O, no cryptography, no clock.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

from relay.config import DkimKeyConfig
from relay.core.headers import header_names, header_section

_FROM_LINE = re.compile(rb"(?im)^from[ \t]*:((?:.*(?:\r?\n[ \t].*)*))")


@dataclass(frozen=True)
class SigningPlan:
    """Sign with `key` over `headers` (lower-case names, From first)."""

    key: DkimKeyConfig
    headers: tuple[str, ...]

    @property
    def domain(self) -> str:
        return self.key.domain

    @property
    def selector(self) -> str:
        return self.key.selector


def author_domain(content: bytes) -> str | None:
    """The domain of the single From address (lower case), or None when there is no From, more
    than one From field or address, or the address has no domain."""
    headers = header_section(content)
    fields = _FROM_LINE.findall(headers)
    if len(fields) != 1:
        return None
    value = re.sub(rb"\r?\n([ \t])", rb"\1", fields[0]).decode("utf-8", "replace")
    addresses = email.utils.getaddresses([value])
    if len(addresses) != 1:
        return None
    _name, address = addresses[0]
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    domain = domain.strip().rstrip(".").lower()
    return domain or None


def signed_headers(configured: Sequence[str], present: Sequence[str]) -> tuple[str, ...]:
    """From, then each configured name the message carries, in the configured order, once."""
    have = set(present)
    chosen = ["from"]
    for name in configured:
        if name in have and name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def plan_signature(keys: Sequence[DkimKeyConfig], content: bytes) -> SigningPlan | None:
    """The signature to add to `content` with the route's `keys`, or None (not signed)."""
    if not keys:
        return None
    domain = author_domain(content)
    if domain is None:
        return None
    key = next((k for k in keys if k.active and k.domain == domain), None)
    if key is None:
        return None
    present = header_names(header_section(content))
    return SigningPlan(key, signed_headers(key.headers, present))


# --------------------------------------------------------------------------- DNS records


def record_name(selector: str, domain: str) -> str:
    """Where the public key is published (RFC 6376 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def record_value(algorithm: str, public_key_b64: str) -> str:
    """The TXT record value (RFC 6376 3.6.1; RFC 8463 for ed25519). `public_key_b64`: for RSA
    the base64 SubjectPublicKeyInfo DER, for ed25519 the base64 raw 32-byte key."""
    kind = "ed25519" if algorithm.startswith("ed25519") else "rsa"
    return f"v=DKIM1; k={kind}; p={public_key_b64}"


def split_txt(value: str, size: int = 255) -> list[str]:
    """A TXT value longer than one character-string (255 octets, RFC 1035 3.3.14) as the
    strings a zone file lists one after the other."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]
