"""DKIM signing (issue 16): the pure decision (relay.core.dkim) as tables, the key adapter
(relay.dkim), ``mailrelay dkim keygen``, and a running relay whose signatures dkimpy verifies
against the project's real DNS server serving the published records (tests/relay/dnsserver.py),
through a key rotation; a body changed downstream fails verification."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim as dkimpy
import dns.resolver
import pytest
import yaml

from relay.config import ConfigError, DkimKeyConfig, RouteConfig, parse_config
from relay.core import dkim as core
from relay.dkim import DkimKeyError, Signer, check_keys, generate_key, parse_private_key, public_record
from tests.relay.apphelp import ConfigMapDir, RelayRun, free_port, relay_to_sink_config
from tests.relay.dnsserver import DnsServer
from tests.relay.smtpsink import SmtpSink


def key(
    domain: str = "example.com", selector: str = "s1", active: bool = True, **extra: Any
) -> DkimKeyConfig:
    return DkimKeyConfig(domain=domain, selector=selector, key_file=Path("/k"), active=active, **extra)


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize(
    ("headers", "domain"),
    [
        (b"From: a@Example.COM\r\n", "example.com"),
        (b'From: "A, B" <a@example.com>\r\n', "example.com"),
        (b"from:\r\n <a@sub.example.com>\r\n", "sub.example.com"),
        (b"From: a@example.com, b@example.com\r\n", None),  # two authors: not guessed
        (b"From: a@example.com\r\nFrom: b@example.com\r\n", None),  # two From fields
        (b"Subject: no author\r\n", None),
        (b"From: undisclosed\r\n", None),
    ],
)
def test_author_domain(headers: bytes, domain: str | None) -> None:
    assert core.author_domain(headers + b"\r\nFrom: body@other.org\r\n") == domain


def test_plan_signs_only_covered_from_domains_with_the_active_key() -> None:
    keys = [key(selector="old", active=False), key(selector="new"), key("other.org", "o1")]
    message = b"From: a@example.com\r\nTo: b@x.test\r\nSubject: s\r\nX-Other: 1\r\n\r\nbody\r\n"
    plan = core.plan_signature(keys, message)
    assert plan is not None and plan.selector == "new" and plan.domain == "example.com"
    assert plan.headers == ("from", "to", "subject")  # configured and present, From first
    assert core.plan_signature(keys, message.replace(b"a@example.com", b"a@sub.example.com")) is None
    assert core.plan_signature(keys, message.replace(b"a@example.com", b"a@evil.test")) is None
    assert core.plan_signature([key(selector="old", active=False)], message) is None
    assert core.plan_signature([], message) is None


def test_signed_headers_from_first_each_once() -> None:
    assert core.signed_headers(["subject", "from", "to", "subject", "cc"], ["to", "subject", "from"]) == (
        "from",
        "subject",
        "to",
    )


def test_route_config_refuses_two_active_keys_or_a_repeated_selector() -> None:
    hop = {"kind": "reject"}
    with pytest.raises(ValueError, match=r"more than one active key for example\.com"):
        RouteConfig.model_validate(
            {"name": "r", "nextHop": hop, "dkim": [key().model_dump(), key(selector="s2").model_dump()]}
        )
    with pytest.raises(ValueError, match="listed twice"):
        RouteConfig.model_validate(
            {"name": "r", "nextHop": hop, "dkim": [key().model_dump(), key(active=False).model_dump()]}
        )
    with pytest.raises(ValueError, match="not a pattern"):
        key("*.example.com")
    with pytest.raises(ValueError, match="invalid header field name"):
        key(headers=["bad name"])


def test_record_format_and_split() -> None:
    assert core.record_name("s1", "example.com") == "s1._domainkey.example.com"
    assert core.record_value("ed25519-sha256", "AAAA") == "v=DKIM1; k=ed25519; p=AAAA"
    assert "".join(core.split_txt("x" * 600)) == "x" * 600
    assert [len(part) for part in core.split_txt("x" * 600)] == [255, 255, 90]


# --------------------------------------------------------------------------- keys


def test_parse_private_key_checks_the_algorithm() -> None:
    rsa_pem = generate_key("rsa-sha256")
    ed_pem = generate_key("ed25519-sha256")
    assert parse_private_key(rsa_pem, "rsa-sha256").algorithm == "rsa-sha256"
    assert len(base64.b64decode(parse_private_key(ed_pem, "ed25519-sha256").public_key_b64)) == 32
    with pytest.raises(DkimKeyError, match="needs an RSA key"):
        parse_private_key(ed_pem, "rsa-sha256")
    with pytest.raises(DkimKeyError, match="needs an Ed25519 key"):
        parse_private_key(rsa_pem, "ed25519-sha256")
    with pytest.raises(DkimKeyError, match="not a PEM private key"):
        parse_private_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n", "rsa-sha256")


def test_check_keys_names_the_route_and_file(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_text("not a key")
    config = parse_config(
        {
            "hostname": "r.test",
            "listeners": [{"name": "smtp", "port": 2525}],
            "routes": [
                {
                    "name": "signed",
                    "nextHop": {"kind": "reject"},
                    "dkim": [
                        {"domain": "example.com", "selector": "s1", "keyFile": str(tmp_path / "bad.key")},
                        {"domain": "other.org", "selector": "s1", "keyFile": str(tmp_path / "none.key")},
                    ],
                }
            ],
        }
    )
    with pytest.raises(ConfigError) as info:
        check_keys(config)
    text = str(info.value)
    assert "routes[signed].dkim.0: DKIM key s1._domainkey.example.com" in text and "bad.key" in text
    assert "routes[signed].dkim.1:" in text and "cannot read" in text


def test_signer_rereads_a_replaced_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(generate_key("ed25519-sha256"))
    config = DkimKeyConfig(domain="example.com", selector="s", key_file=path, algorithm="ed25519-sha256")
    signer = Signer()
    first = signer.key(config)
    assert signer.key(config) is first  # cached
    path.write_bytes(generate_key("ed25519-sha256") + b"\n")  # a Secret update swaps the file
    assert signer.key(config).public_key_b64 != first.public_key_b64


def test_keygen_writes_a_secret_and_prints_the_record(tmp_path: Path) -> None:
    out = tmp_path / "secret.yaml"
    command = [
        sys.executable,
        "-m",
        "relay",
        "dkim",
        "keygen",
        "--domain",
        "Example.com",
        "--selector",
        "2026a",
    ]
    done = subprocess.run([*command, "-o", str(out), "--namespace", "mail"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    secret = yaml.safe_load(out.read_text())
    assert secret["kind"] == "Secret" and secret["metadata"] == {
        "name": "dkim-2026a-example-com",
        "namespace": "mail",
    }
    assert out.stat().st_mode & 0o077 == 0
    pem = base64.b64decode(secret["data"]["private.key"])
    name, value = public_record(pem, "rsa-sha256", "2026a", "example.com")
    printed = done.stdout.replace('" "', "")  # the TXT strings joined
    assert f'{name}. IN TXT "{value}"' in printed
    again = subprocess.run([*command, "-o", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr  # a key in use is never overwritten
    bad = subprocess.run(
        [*command[:-1], "bad selector!", "-o", str(tmp_path / "x.yaml")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "selector" in bad.stderr


# --------------------------------------------------------------------------- a running relay


def dns_txt(server: DnsServer) -> Any:
    """A dkimpy dnsfunc that asks the test DNS server (a real resolver, a real UDP query)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return b""
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    return lookup


def publish(server: DnsServer, pem: bytes, algorithm: str, selector: str, domain: str) -> None:
    name, value = public_record(pem, algorithm, selector, domain)
    server.add(name, "TXT", " ".join(f'"{part}"' for part in core.split_txt(value)))


def message(author: str, subject: str) -> bytes:
    return (
        f"From: Author <{author}>\r\nTo: user@example.net\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@test>\r\n\r\nHello,\r\n.leading dot line\r\n\r\n"
    ).encode()


async def send(port: int, author: str, subject: str) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    await smtp.sendmail(author, ["user@example.net"], message(author, subject))
    await smtp.quit()


async def arrived(sink: SmtpSink, count: int) -> None:
    async def wait() -> None:
        while len(sink.messages) < count:
            sink.arrived.clear()
            await sink.arrived.wait()

    await asyncio.wait_for(wait(), 30)


def dkim_entry(path: Path, selector: str, algorithm: str, active: bool = True) -> dict[str, Any]:
    return {
        "domain": "example.com",
        "selector": selector,
        "keyFile": str(path),
        "algorithm": algorithm,
        "active": active,
    }


async def test_relay_signs_verifiably_through_a_key_rotation(
    tmp_path: Path, runs: list[RelayRun], dns_server: DnsServer
) -> None:
    old_pem, new_pem = generate_key("rsa-sha256"), generate_key("ed25519-sha256")
    (tmp_path / "old.key").write_bytes(old_pem)
    (tmp_path / "new.key").write_bytes(new_pem)
    publish(dns_server, old_pem, "rsa-sha256", "old", "example.com")
    verify = dns_txt(dns_server)
    sink = await SmtpSink().start()
    smtp_port = free_port()
    config = relay_to_sink_config(
        tmp_path,
        hostname="dkim.relay.test",
        domains=["example.net"],
        smtp_port=smtp_port,
        metrics_port=free_port(),
        sink_port=sink.port,
        workers=1,
    )
    config["routes"][0]["dkim"] = [dkim_entry(tmp_path / "old.key", "old", "rsa-sha256")]
    configmap = ConfigMapDir(tmp_path / "config")
    configmap.publish(config)
    run = RelayRun(configmap.path).start()
    runs.append(run)
    try:
        await asyncio.to_thread(run.wait_for, r"ready \(pid")
        await send(smtp_port, "a@example.com", "one")
        await send(smtp_port, "a@elsewhere.org", "unsigned")  # From domain not covered
        await arrived(sink, 2)
        one = next(m.content for m in sink.messages if b"Subject: one" in m.content)
        unsigned = next(m.content for m in sink.messages if b"Subject: unsigned" in m.content)
        assert one.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;") and b" s=old;" in one
        assert b"DKIM-Signature" not in unsigned
        assert dkimpy.verify(one, dnsfunc=verify)
        # a body changed downstream (a footer added) no longer verifies; neither does a header
        assert not dkimpy.verify(one.replace(b"Hello,", b"Hello, (scanned)"), dnsfunc=verify)
        assert not dkimpy.verify(one.replace(b"Subject: one", b"Subject: 0ne"), dnsfunc=verify)

        # rotation: the new key's record is published first, then it becomes active and the old
        # one is kept listed (inactive) until its record is withdrawn
        publish(dns_server, new_pem, "ed25519-sha256", "new", "example.com")
        config["routes"][0]["dkim"] = [
            dkim_entry(tmp_path / "old.key", "old", "rsa-sha256", active=False),
            dkim_entry(tmp_path / "new.key", "new", "ed25519-sha256"),
        ]
        configmap.publish(config)
        await asyncio.to_thread(run.wait_for, "config reloaded")
        await send(smtp_port, "b@example.com", "two")
        await arrived(sink, 3)
        two = next(m.content for m in sink.messages if b"Subject: two" in m.content)
        assert two.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;") and b" s=new;" in two
        # during the overlap both records are in DNS: mail signed before and after verifies
        assert dkimpy.verify(two, dnsfunc=verify)
        assert dkimpy.verify(one, dnsfunc=verify)
        dns_server.remove("old._domainkey.example.com")  # the old record is withdrawn
        assert not dkimpy.verify(one, dnsfunc=verify)
        assert dkimpy.verify(two, dnsfunc=verify)

        # a reload with a broken key is refused; the running keys stay in use
        (tmp_path / "broken.key").write_text("-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
        config["routes"][0]["dkim"] = [dkim_entry(tmp_path / "broken.key", "new", "ed25519-sha256")]
        configmap.publish(config)
        await asyncio.to_thread(run.wait_for, "invalid file, keeping the running configuration")
        assert "routes[to-sink].dkim.0" in run.log
        await send(smtp_port, "c@example.com", "three")
        await arrived(sink, 4)
        three = next(m.content for m in sink.messages if b"Subject: three" in m.content)
        assert b" s=new;" in three and dkimpy.verify(three, dnsfunc=verify)
    finally:
        await sink.stop()


def test_relay_with_an_unusable_key_exits_2(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_bytes(generate_key("ed25519-sha256"))
    config = relay_to_sink_config(
        tmp_path,
        hostname="r.test",
        domains=["example.net"],
        smtp_port=free_port(),
        metrics_port=free_port(),
        sink_port=1,
    )
    config["routes"][0]["dkim"] = [dkim_entry(tmp_path / "k.pem", "s1", "rsa-sha256")]
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "relay", "relay", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "routes[to-sink].dkim.0" in done.stderr and "rsa-sha256 needs an RSA key" in done.stderr
