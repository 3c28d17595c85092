"""MTA-STS (RFC 8461) on MX delivery (issue 16): the parsing and the decisions as tables
(relay.core.mta_sts), then a running relay against the project's real DNS server, a real local
HTTPS policy server (aiohttp, certificates from a test CA) and real SMTP sinks on loopback: a
matching, verified MX gets the mail; a non-matching MX or a failed certificate defers under
enforce; testing delivers and reports; no policy is opportunistic. TLS-RPT style counters."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme
from aiohttp import web

from relay.core import mta_sts
from relay.core.mta_sts import Policy, PolicyError
from tests.doctor import require
from tests.relay.apphelp import RelayRun, free_port, http_get, relay_to_sink_config, until, write_config
from tests.relay.dnsserver import DnsServer
from tests.relay.smtpsink import SmtpSink


@pytest.mark.parametrize(
    ("records", "policy_id"),
    [
        (["v=STSv1; id=20260101T000000;"], "20260101T000000"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two: no policy (RFC 8461 3.1)
        (["v=STSv1; id=has-dash"], None),
        (["v=STSv2; id=a"], None),
        ([], None),
    ],
)
def test_txt_id(records: list[str], policy_id: str | None) -> None:
    assert mta_sts.txt_id(records) == policy_id


def test_parse_policy() -> None:
    text = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.Example.net\r\nmax_age: 86400\r\n"
    assert mta_sts.parse_policy(text, "id1") == Policy(
        "enforce", ("mx1.example.com", "*.example.net"), 86400, "id1"
    )
    assert mta_sts.parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()
    for bad, why in [
        ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999999\n", "max_age"),
        ("<html>not a policy</html>", "key: value"),
    ]:
        with pytest.raises(PolicyError, match=why):
            mta_sts.parse_policy(bad)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx1.example.com", "MX1.example.com.", True),
        ("*.example.net", "mx.example.net", True),
        ("*.example.net", "a.b.example.net", False),  # one label only
        ("*.example.net", "example.net", False),
        ("mx1.example.com", "mx2.example.com", False),
    ],
)
def test_mx_matches(pattern: str, host: str, matches: bool) -> None:
    assert mta_sts.mx_matches(pattern, host) is matches


def test_plan_tls() -> None:
    hosts = ["mx1.d.test", "backup.other.test"]
    enforce = Policy("enforce", ("*.d.test",), 60)
    plan = mta_sts.plan_tls("mta-sts", hosts, enforce)
    assert plan.hosts == (("mx1.d.test", "verify"),) and plan.refused == ("backup.other.test",)
    assert mta_sts.plan_tls("mta-sts", ["x.other.test"], enforce).hosts == ()  # nothing may be tried
    testing = mta_sts.plan_tls("mta-sts", hosts, Policy("testing", ("*.d.test",), 60))
    assert testing.hosts == (("mx1.d.test", "testing"), ("backup.other.test", "opportunistic"))
    assert mta_sts.plan_tls("mta-sts", hosts, None).hosts == tuple((h, "opportunistic") for h in hosts)
    assert mta_sts.plan_tls("mta-sts", hosts, Policy("none", (), 60)).policy == "mta-sts-none"
    assert mta_sts.plan_tls("verify", hosts, None).hosts == tuple((h, "verify") for h in hosts)


# --------------------------------------------------------------------------- a running relay

POLICIES = {
    "good.test": "version: STSv1\nmode: enforce\nmx: *.good.test\nmax_age: 3600\n",
    "nomatch.test": "version: STSv1\nmode: enforce\nmx: mx.elsewhere.test\nmax_age: 3600\n",
    "badcert.test": "version: STSv1\nmode: enforce\nmx: *.badcert.test\nmax_age: 3600\n",
    "testing.test": "version: STSv1\nmode: testing\nmx: *.testing.test\nmax_age: 3600\n",
}
DOMAINS = [*POLICIES, "plain.test"]


class PolicyServer:
    """HTTPS on 127.x.y.z:443 answering /.well-known/mta-sts.txt for every mta-sts.<domain>."""

    def __init__(self, host: str, context: ssl.SSLContext) -> None:
        self.host, self.context = host, context
        self.hits: dict[str, int] = {}
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        domain = request.host.split(":")[0].removeprefix("mta-sts.")
        self.hits[domain] = self.hits.get(domain, 0) + 1
        if domain not in POLICIES:
            return web.Response(status=404)
        return web.Response(text=POLICIES[domain], content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, 443, ssl_context=self.context).start()


@pytest.fixture
async def world(
    tmp_path: Path, dns_server: DnsServer
) -> AsyncIterator[tuple[dict[str, SmtpSink], PolicyServer, Path]]:
    require("privileged-ports")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    net = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}"
    web_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(f"mta-sts.{d}" for d in DOMAINS)).configure_cert(web_context)
    policy_server = PolicyServer(f"{net}.1", web_context)
    await policy_server.start()
    port = free_port(f"{net}.10")
    sinks: dict[str, SmtpSink] = {}
    for index, domain in enumerate(DOMAINS):
        address, mx = f"{net}.{10 + index}", f"mx1.{domain}"
        context = None
        if domain != "plain.test":  # plain.test offers no STARTTLS at all
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            # badcert and testing serve a certificate for another name
            name = "wrong-name.test" if domain in ("badcert.test", "testing.test") else mx
            ca.issue_cert(name).configure_cert(context)
        sinks[domain] = await SmtpSink(host=address, port=port, starttls_context=context).start()
        dns_server.add(domain, "MX", f"10 {mx}.")
        dns_server.add(mx, "A", address)
        dns_server.add(f"mta-sts.{domain}", "A", policy_server.host)
        if domain in POLICIES:
            dns_server.add(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=2026a;"')
    yield sinks, policy_server, ca_file
    for sink in sinks.values():
        await sink.stop()
    assert policy_server.runner is not None
    await policy_server.runner.cleanup()


async def send(port: int, rcpt: str) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    await smtp.sendmail("a@sender.org", [rcpt], f"From: a@sender.org\r\nTo: {rcpt}\r\n\r\nx\r\n")
    await smtp.quit()


def counter(body: str, name: str, **labels: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_mta_sts_enforce_testing_and_no_policy(
    tmp_path: Path,
    runs: list[RelayRun],
    dns_server: DnsServer,
    world: tuple[dict[str, SmtpSink], PolicyServer, Path],
) -> None:
    sinks, policy_server, ca_file = world
    smtp_port, metrics_port = free_port(), free_port()
    port = sinks["good.test"].port
    config = relay_to_sink_config(
        tmp_path,
        hostname="sts.relay.test",
        domains=DOMAINS,
        smtp_port=smtp_port,
        metrics_port=metrics_port,
        sink_port=1,
        workers=1,
        dns={"nameservers": [dns_server.nameserver]},
    )
    config["routes"] = [
        {
            "name": "internet",
            "nextHop": {"kind": "mx", "port": port, "tls": "mta-sts", "caFile": str(ca_file)},
        }
    ]
    run = RelayRun(write_config(tmp_path, config)).start()
    runs.append(run)
    await asyncio.to_thread(run.wait_for, r"ready \(pid")
    for domain in DOMAINS:
        await send(smtp_port, f"u@{domain}")

    # enforce, matching MX, valid certificate: delivered over verified TLS
    await until(lambda: len(sinks["good.test"].messages) == 1, timeout=30)
    assert sinks["good.test"].messages[0].tls
    # enforce, MX not in the policy: deferred, never sent there
    await asyncio.to_thread(run.wait_for, r"u@nomatch\.test=deferred \d+ 4\.7\.5")
    assert "MX mx1.nomatch.test not in the policy (mx.elsewhere.test); not tried" in run.log
    # enforce, certificate for another name: deferred, no clear-text fallback
    await asyncio.to_thread(run.wait_for, r"u@badcert\.test=deferred 421 4\.7\.5")
    # testing: the verification failure is reported, the mail delivered anyway
    await until(lambda: len(sinks["testing.test"].messages) == 1, timeout=30)
    assert "MTA-STS testing: verified TLS with mx1.testing.test" in run.log
    # no policy: opportunistic, here in clear text (the sink offers no STARTTLS)
    await until(lambda: len(sinks["plain.test"].messages) == 1, timeout=30)
    assert not sinks["plain.test"].messages[0].tls
    assert sinks["nomatch.test"].messages == [] and sinks["badcert.test"].messages == []

    # the policy is cached for its max_age: a second message does not fetch it again
    await send(smtp_port, "v@good.test")
    await until(lambda: len(sinks["good.test"].messages) == 2, timeout=30)
    assert policy_server.hits["good.test"] == 1

    _, body = await asyncio.to_thread(http_get, metrics_port, "/metrics")
    sessions = "mailrelay_tls_sessions_total"
    # one session: the second message went over the pooled, verified one
    assert counter(body, sessions, domain="good.test", policy="mta-sts-enforce", result="verified") == 1
    assert counter(body, sessions, domain="badcert.test", policy="mta-sts-enforce", result="failed") >= 1
    assert counter(body, sessions, domain="nomatch.test", policy="mta-sts-enforce", result="failed") >= 1
    assert counter(body, sessions, domain="testing.test", policy="mta-sts-testing", result="failed") >= 1
    assert counter(body, sessions, domain="plain.test", policy="opportunistic", result="cleartext") >= 1
    assert counter(body, "mailrelay_mta_sts_policies_total", result="fetched") == 4
    assert counter(body, "mailrelay_mta_sts_policies_total", result="cached") >= 1
