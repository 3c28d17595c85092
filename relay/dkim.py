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

import logging
import os
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import ConfigError, DkimKeyConfig, RelayConfig
from relay.core.dkim import DkimKeyError, LoadedKey, SigningPlan, parse_private_key, public_record

__all__ = [
    "DkimKeyError",
    "LoadedKey",
    "Signer",
    "check_keys",
    "generate_key",
    "parse_private_key",
    "public_record",
]

log = logging.getLogger(__name__)


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
