"""TLS between relays (issue 16): an edge relay delivers to an internal relay over STARTTLS,
the certificate verified against a CA laid out as cert-manager writes its Secrets (ca.crt,
tls.crt, tls.key), all made in the test with the cryptography package. Two real relay
processes and a real sink; a certificate from another CA defers with starttls-verify and is
accepted (encrypted, unauthenticated) with plain starttls."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import RelayHop, parse_config
from relay.delivery import target_for_hop
from tests.relay.apphelp import RelayRun, free_port, relay_to_sink_config, until, write_config
from tests.relay.smtpsink import SmtpSink


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def cert_manager_secret(directory: Path, ca_name: str = "test CA") -> Path:
    """A CA and a server certificate for 127.0.0.1 and localhost, as the files of a mounted
    cert-manager Secret: ca.crt, tls.crt, tls.key."""
    directory.mkdir(parents=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("internal relay"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return directory


def test_relay_hop_target_follows_its_tls_setting() -> None:
    plain = target_for_hop(RelayHop(name="i", host="i.svc", port=25))
    assert plain.tls == "none"
    encrypted = target_for_hop(RelayHop(name="i", host="i.svc", tls="starttls"))
    assert (encrypted.tls, encrypted.verify) == ("starttls", False)
    verified = target_for_hop(
        RelayHop(name="i", host="i.svc", tls="starttls-verify", ca_file=Path("/ca.crt"))
    )
    assert (verified.tls, verified.verify, verified.ca_file, verified.name) == (
        "starttls",
        True,
        Path("/ca.crt"),
        "i.svc",
    )
    with pytest.raises(ValueError, match="caFile needs tls starttls-verify"):
        RelayHop(name="i", host="i.svc", tls="starttls", ca_file=Path("/ca.crt"))


def tls_hop(content: bytes) -> bool:
    """Whether the internal relay's Received header (the first) records the edge over TLS."""
    first = content.decode().split("\r\nReceived:", 1)[0]
    return "from edge.relay.test" in first and "(using TLSv1." in first and "with ESMTPS" in first


async def send(port: int, rcpt: str) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    await smtp.sendmail(
        "a@sender.org", [rcpt], f"From: a@sender.org\r\nTo: {rcpt}\r\nSubject: hop\r\n\r\nx\r\n"
    )
    await smtp.quit()


def internal_config(tmp_path: Path, secret: Path, port: int, sink_port: int) -> dict[str, Any]:
    config = relay_to_sink_config(
        tmp_path / "internal",
        hostname="internal.relay.test",
        domains=["corp.test"],
        smtp_port=port,
        metrics_port=free_port(),
        sink_port=sink_port,
        workers=1,
        tls={"certFile": str(secret / "tls.crt"), "keyFile": str(secret / "tls.key")},
    )
    config["listeners"][0]["tls"] = "starttls"
    config["trustedNetworks"] = ["127.0.0.0/8"]
    return config


def edge_config(tmp_path: Path, port: int, internal_port: int, hop_tls: dict[str, Any]) -> dict[str, Any]:
    config = relay_to_sink_config(
        tmp_path / "edge",
        hostname="edge.relay.test",
        domains=["corp.test"],
        smtp_port=port,
        metrics_port=free_port(),
        sink_port=internal_port,
        workers=1,
    )
    config["routes"][0]["nextHop"].update(name="internal", **hop_tls)
    parse_config(config)
    return config


async def test_edge_to_internal_hop_runs_verified_starttls(tmp_path: Path, runs: list[RelayRun]) -> None:
    secret = cert_manager_secret(tmp_path / "internal-tls")
    other_ca = cert_manager_secret(tmp_path / "other-ca", ca_name="another CA")
    sink = await SmtpSink().start()
    internal_port = free_port()
    (tmp_path / "internal").mkdir()
    internal = RelayRun(
        write_config(tmp_path / "internal", internal_config(tmp_path, secret, internal_port, sink.port))
    )
    runs.append(internal.start())
    edges: dict[str, tuple[int, RelayRun]] = {}
    for name, hop_tls in {
        "verified": {"tls": "starttls-verify", "caFile": str(secret / "ca.crt")},
        "wrong-ca": {"tls": "starttls-verify", "caFile": str(other_ca / "ca.crt")},
        "unverified": {"tls": "starttls"},
    }.items():
        port = free_port()
        (tmp_path / name / "edge").mkdir(parents=True)
        run = RelayRun(
            write_config(tmp_path / name, edge_config(tmp_path / name, port, internal_port, hop_tls))
        )
        runs.append(run.start())
        edges[name] = (port, run)
    try:
        for _port, run in [(0, internal), *edges.values()]:
            await asyncio.to_thread(run.wait_for, r"ready \(pid")
        await send(edges["verified"][0], "verified@corp.test")
        await until(lambda: len(sink.messages) == 1, timeout=30)
        [received] = sink.messages
        # the internal relay's own Received header says the edge came in over TLS
        assert tls_hop(received.content)
        # a certificate the configured CA did not sign: deferred, never sent in clear
        await send(edges["wrong-ca"][0], "wrong@corp.test")
        line = await asyncio.to_thread(edges["wrong-ca"][1].wait_for, r"deferred 1 recipients")
        assert "wrong@corp.test=deferred 421 4.7.5" in line  # TLS handshake failed: no fallback
        assert all(b"wrong@corp.test" not in m.content for m in sink.messages)

        # starttls without verification: encrypted, the certificate not checked
        await send(edges["unverified"][0], "unverified@corp.test")
        await until(lambda: len(sink.messages) == 2, timeout=30)
        assert tls_hop(sink.messages[1].content)
    finally:
        await sink.stop()
