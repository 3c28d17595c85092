"""DNS faults on the MX route: SERVFAIL and a server that never answers defer the mail, which is
delivered once DNS answers again; NXDOMAIN and a null MX (RFC 7505) bounce it with an RFC 3464
DSN to the sender. A real authoritative DNS server on loopback, a real relay process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.faults.harness import Relay, record_figures, relay_config, running_sink, send_one
from tests.relay.apphelp import free_port
from tests.relay.dnsserver import DnsServer


async def test_dns_failures_defer_then_deliver_and_nonexistence_bounces(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    with running_sink() as mx, running_sink() as senders:
        config = relay_config(
            tmp_path,
            smtp_port=free_port(),
            routes=[
                {  # bounces go back to the sender's domain through their own hop
                    "name": "to-senders",
                    "priority": 10,
                    "match": {"recipientDomains": ["sender.test"]},
                    "nextHop": {"kind": "relay", "name": "out", "host": "127.0.0.1", "port": senders.port},
                },
                {"name": "internet", "nextHop": {"kind": "mx", "port": mx.port, "tls": "none"}},
            ],
            dns={"nameservers": [dns_server.nameserver], "timeout": "1s"},
        )
        dns_server.servfail("servfail.test")
        dns_server.drop("timeout.test")
        dns_server.add("nullmx.test", "MX", "0 .")
        relay = Relay(tmp_path, config)
        try:
            await relay.astart()
            for token, domain in [
                ("servfail", "servfail.test"),
                ("timeout", "timeout.test"),
                ("nxdomain", "nxdomain.test"),
                ("nullmx", "nullmx.test"),
            ]:
                await send_one(relay.port, token, rcpt=f"user@{domain}")
            for domain in ("servfail", "timeout"):
                await asyncio.to_thread(
                    relay.run.wait_for, rf"deferred 1 recipients.*user@{domain}\.test", timeout=60
                )
            # nothing at the MX yet; the two that do not exist bounced to the sender
            await asyncio.to_thread(senders.wait_count, 2, 60)
            assert mx.tokens() == {}
            # DNS answers again
            for domain in ("servfail.test", "timeout.test"):
                dns_server.servfail(domain, False)
                dns_server.drop(domain, False)
                dns_server.add(domain, "MX", f"10 mx.{domain}.")
                dns_server.add(f"mx.{domain}", "A", "127.0.0.1")
            await asyncio.to_thread(mx.wait_tokens, {"servfail", "timeout"}, 60)
            await asyncio.to_thread(relay.wait_queue_empty, 60)
            relay.run.signal(signal.SIGTERM)
            assert await asyncio.to_thread(relay.run.wait, 30) == 0

            dsns = [m for m in senders.messages if m.mail_from == ""]
            bounced = {
                token
                for token, domain in (("nxdomain", b"nxdomain.test"), ("nullmx", b"nullmx.test"))
                if any(domain in m.content for m in dsns)
            }
            record_figures(
                "faults.dns",
                sent=4,
                accepted=4,
                delivered=len(set(mx.tokens())),
                duplicated=sum(n - 1 for n in mx.tokens().values()),
                delivered_after_servfail=mx.tokens()["servfail"],
                delivered_after_timeout=mx.tokens()["timeout"],
                bounced_with_dsn=len(bounced),
                dsns=len(dsns),
                lost=4 - len(set(mx.tokens())) - len(bounced),
            )
            assert mx.tokens() == {"servfail": 1, "timeout": 1}
            assert len(dsns) == 2 and len(senders.messages) == 2
            assert bounced == {"nxdomain", "nullmx"}
            for message in dsns:
                assert message.rcpt_tos == ["sender@sender.test"]
                assert b'multipart/report; report-type="delivery-status"' in message.content
                assert b"Action: failed" in message.content
            assert dns_server.count("servfail.test", "MX") >= 2  # asked again after the failure
            relay.assert_no_traceback()
        finally:
            relay.stop()
