"""DKIM signing decisions (RFC 6376): which key signs a message, over which header fields, and
what DNS record publishes a key.

relay.hops asks `plan_signature` once per SMTP hop with the route's keys and the message
content; relay.dkim (the adapter around dkimpy) does the signing with the plan after the last
change to the content (relay.smtp_transaction's 8BITMIME conversion) and before the hop. The
operator and ``mailrelay dkim keygen`` ask `record_name` and `record_value` what TXT record to
publish.

Rules:
- a message is signed only when it has exactly one From header field with exactly one address
  (RFC 5322 3.6.2 allows a list there; we do not guess which author counts) and an *active* key
  of the route has that address's domain exactly (lower-cased): a sub-domain is not covered by
  its parent's key, mail from any other domain is never signed;
- an inactive key (the old one during a rotation) never signs; it is listed so that its DNS
  record stays in the status until it is withdrawn;
- the signed header fields are From first (RFC 6376 5.4 requires it), then each configured name
  that the message carries, in the configured order, each once.

`parse_private_key` checks a PEM key against its algorithm and gives the public half (the
operator checks Secrets with it, relay.dkim loads keys with it): computation with the
cryptography package, no I/O.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import base64
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

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


# --------------------------------------------------------------------------- keys and DNS records

MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers must not accept less; 2048 recommended


class DkimKeyError(ValueError):
    """A DKIM key that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LoadedKey:
    algorithm: str
    signing_key: bytes  # what dkimpy takes: PEM for RSA, base64 of the raw seed for ed25519
    public_key_b64: str  # the p= value of the DNS record


def parse_private_key(pem: bytes, algorithm: str, *, where: str = "") -> LoadedKey:
    """A PEM private key checked against `algorithm`; DkimKeyError names what is wrong
    (prefixed with `where`)."""
    prefix = f"{where}: " if where else ""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:  # cryptography's text names its FAQ, not the problem
        raise DkimKeyError(f"{prefix}not a PEM private key without a password") from exc
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise DkimKeyError(f"{prefix}unsupported private key: {exc}") from exc
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(f"{prefix}rsa-sha256 needs an RSA key, got {type(key).__name__}")
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{prefix}RSA key of {key.key_size} bits; use at least 2048 (RFC 8301)")
        signing = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif algorithm == "ed25519-sha256":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DkimKeyError(f"{prefix}ed25519-sha256 needs an Ed25519 key, got {type(key).__name__}")
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        signing = base64.b64encode(seed)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise DkimKeyError(f"{prefix}unknown algorithm {algorithm!r}")
    return LoadedKey(algorithm, signing, base64.b64encode(public).decode("ascii"))


def record_name(selector: str, domain: str) -> str:
    """Where the public key is published (RFC 6376 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def record_value(algorithm: str, public_key_b64: str) -> str:
    """The TXT record value (RFC 6376 3.6.1; RFC 8463 for ed25519). `public_key_b64`: for RSA
    the base64 SubjectPublicKeyInfo DER, for ed25519 the base64 raw 32-byte key."""
    kind = "ed25519" if algorithm.startswith("ed25519") else "rsa"
    return f"v=DKIM1; k={kind}; p={public_key_b64}"


def public_record(pem: bytes, algorithm: str, selector: str, domain: str) -> tuple[str, str]:
    """(TXT name, TXT value) publishing the public half of `pem`."""
    loaded = parse_private_key(pem, algorithm)
    return record_name(selector, domain), record_value(algorithm, loaded.public_key_b64)


def split_txt(value: str, size: int = 255) -> list[str]:
    """A TXT value longer than one character-string (255 octets, RFC 1035 3.3.14) as the
    strings a zone file lists one after the other."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]
