"""DKIM signing keys and signatures (RFC 6376, RFC 8463): the adapter around dkimpy.

relay.delivery signs a message with `Signer.signature(plan, content)` after the last change
to its content and before it goes on the wire; which key and which header fields is decided by
relay.core.dkim (`plan_signature`). Keys are PEM files (a mounted Secret's key, the operator
renders the path into ``routes[].dkim[].keyFile``): RSA (PKCS#1 or PKCS#8) for rsa-sha256,
Ed25519 (PKCS#8) for ed25519-sha256. `check_keys` reads every key of a configuration: the
relay refuses to start (``mailrelay relay`` exits 2) or keeps its running configuration on a
reload when a key cannot be read, is not a private key, or does not fit its algorithm.
`public_record` is what the operator and ``mailrelay dkim keygen`` publish.

A key file is read again when its mtime or size changes (a Secret update swaps the mounted
file). A key that cannot be used at delivery time raises `DkimKeyError`; relay.delivery defers
the message (4.7.0) rather than sending mail that its domain's DMARC policy may reject.

No decisions here (relay.core.dkim) and no network: DNS is for verifiers, not for signers.
"""

from __future__ import annotations

import base64
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import ConfigError, DkimKeyConfig, RelayConfig
from relay.core.dkim import SigningPlan, record_name, record_value

log = logging.getLogger(__name__)

MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers must not accept less; 2048 recommended


class DkimKeyError(Exception):
    """A DKIM key that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LoadedKey:
    algorithm: str
    signing_key: bytes  # what dkimpy takes: PEM for RSA, base64 of the raw seed for ed25519
    public_key_b64: str  # the p= value of the DNS record


def parse_private_key(pem: bytes, algorithm: str, *, where: str = "key") -> LoadedKey:
    """A PEM private key checked against `algorithm`; DkimKeyError names what is wrong."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimKeyError(f"{where}: not a PEM private key without a password ({exc})") from exc
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise DkimKeyError(f"{where}: unsupported private key: {exc}") from exc
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(f"{where}: rsa-sha256 needs an RSA key, got {type(key).__name__}")
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{where}: RSA key of {key.key_size} bits; use at least 2048 (RFC 8301)")
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
            raise DkimKeyError(f"{where}: ed25519-sha256 needs an Ed25519 key, got {type(key).__name__}")
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        signing = base64.b64encode(seed)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise DkimKeyError(f"{where}: unknown algorithm {algorithm!r}")
    return LoadedKey(algorithm, signing, base64.b64encode(public).decode("ascii"))


def public_record(pem: bytes, algorithm: str, selector: str, domain: str) -> tuple[str, str]:
    """(TXT name, TXT value) publishing the public half of `pem`."""
    loaded = parse_private_key(pem, algorithm)
    return record_name(selector, domain), record_value(algorithm, loaded.public_key_b64)


def generate_key(algorithm: str, bits: int = 2048) -> bytes:
    """A new private key as PKCS#8 PEM."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Signer:
    """Loads keys (cached per file, reloaded when the file changes) and signs."""

    def __init__(self) -> None:
        self._keys: dict[tuple[Path, str], tuple[tuple[int, int], LoadedKey]] = {}
        self.signed = 0

    def key(self, config: DkimKeyConfig) -> LoadedKey:
        path = config.key_file
        where = f"DKIM key {config.selector}._domainkey.{config.domain} ({path})"
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise DkimKeyError(f"{where}: cannot read: {exc.strerror or exc}") from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._keys.get((path, config.algorithm))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise DkimKeyError(f"{where}: cannot read: {exc.strerror or exc}") from exc
        loaded = parse_private_key(pem, config.algorithm, where=where)
        self._keys[(path, config.algorithm)] = (stamp, loaded)
        return loaded

    def signature(self, plan: SigningPlan, content: bytes) -> bytes:
        """The ``DKIM-Signature:`` header field (CRLF lines) to put before `content`."""
        loaded = self.key(plan.key)
        try:
            header = dkim.sign(
                content,
                plan.selector.encode("ascii"),
                plan.domain.encode("ascii"),
                loaded.signing_key,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=plan.key.algorithm.encode("ascii"),
                include_headers=[name.encode("ascii") for name in plan.headers],
                linesep=b"\r\n",
            )
        except dkim.DKIMException as exc:
            where = f"{plan.selector}._domainkey.{plan.domain}"
            raise DkimKeyError(f"DKIM signing with {where} failed: {exc}") from exc
        self.signed += 1
        return bytes(header)


def check_keys(config: RelayConfig, signer: Signer | None = None) -> None:
    """Read every DKIM key of `config`; ConfigError naming the route and key when one fails."""
    signer = signer or Signer()
    problems = []
    for route in config.routes:
        for index, key in enumerate(route.dkim):
            try:
                signer.key(key)
            except DkimKeyError as exc:
                problems.append(f"routes[{route.name}].dkim.{index}: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))
