"""PROXY protocol on real loopback sockets: behind a trusted proxy the relay judges the client
the header announces (relay permission, per-client limits, Received:), and a connection from an
untrusted source, or without a valid header, is dropped, logged and counted.

The relay trusts 127.0.0.0/8 for relaying, the classic set-up in a cluster where every
connection seems to come from a node or a load balancer: without the PROXY header that would
be an open relay for the whole Internet behind the balancer."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from relay.front import Front
from tests.relay.fronthelp import RawClient, make_certs, make_config, running_front

PROXY = "127.0.0.5"  # the load balancer
STRANGER = "127.0.0.6"  # not a trusted proxy
OUTSIDE = "203.0.113.7"  # a client on the Internet, announced by the proxy
MESSAGE = b"Subject: hi\r\nFrom: a@sender.org\r\n\r\nbody\r\n.\r\n"


def v1(client: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if ":" in client else "127.0.0.1"
    return f"PROXY {family} {client} {server} {port} 25\r\n".encode()


def v2(client: str, port: int = 40000, *, command: int = 1, tlv: bytes = b"") -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    address = ipaddress.ip_address(client)
    if address.version == 4:
        body = address.packed + ipaddress.ip_address("127.0.0.1").packed + struct.pack("!HH", port, 25)
        family = 0x11
    else:
        body = address.packed + ipaddress.ip_address("::1").packed + struct.pack("!HH", port, 25)
        family = 0x21
    body += tlv
    return signature + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def proxied_config(tmp_path: Path, **proxy: Any) -> Any:
    return make_config(
        tmp_path,
        trustedNetworks=["127.0.0.0/8"],
        listeners=[
            {
                "name": "smtp",
                "host": "127.0.0.1",
                "port": 2525,
                "mode": "relay",
                "proxyProtocol": {"trustedFrom": [f"{PROXY}/32"], "timeout": "2s", **proxy},
            }
        ],
        routes=[{"name": "all", "nextHop": {"kind": "mx"}}],
        limits={"maxConnectionsPerClient": 1},
    )


async def connect(front: Front, source: str, header: bytes, listener: str = "smtp") -> RawClient:
    host, port = front.addresses[listener]
    client = await RawClient.connect(host, port, local_addr=(source, 0))
    if header:
        await client.send(header)
    return client


def dropped(listener: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "mailrelay_proxy_dropped_total", {"listener": listener, "reason": reason}
    )
    return value or 0.0


async def relay_attempt(client: RawClient) -> tuple[int, int]:
    """(reply to RCPT for an outside domain, reply to RCPT for an accept domain)."""
    code, _ = await client.reply()
    assert code == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@sender.org>"))[0] == 250
    outside = (await client.cmd("RCPT TO:<victim@evil.test>"))[0]
    inside = (await client.cmd("RCPT TO:<u@example.com>"))[0]
    return outside, inside


@pytest.mark.parametrize("make_header", [v1, v2], ids=["v1", "v2"])
async def test_announced_outside_client_may_not_relay_and_is_in_received(
    tmp_path: Path, make_header: Any
) -> None:
    async with running_front(proxied_config(tmp_path)) as front:
        client = await connect(front, PROXY, make_header(OUTSIDE))
        assert await relay_attempt(client) == (554, 250)
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(MESSAGE)
        assert (await client.reply())[0] == 250
        await client.close()
        [queue_id] = front.spool.ids("incoming")
        found = front.spool.read(queue_id)
        assert found is not None
        _state, message = found
        first = message.content.split(b"\r\n", 2)[:2]
        assert f"[{OUTSIDE}]".encode() in b" ".join(first), first
        assert PROXY.encode() not in message.content
        assert message.entry.client_address == OUTSIDE

        # A client the proxy announces from a trusted network may relay (the header, not the
        # proxy's own address, decides).
        client = await connect(front, PROXY, make_header("127.0.0.9"))
        assert await relay_attempt(client) == (250, 250)
        await client.close()


async def test_ipv6_client_and_tlvs(tmp_path: Path) -> None:
    async with running_front(proxied_config(tmp_path)) as front:
        client = await connect(front, PROXY, v2("2001:db8::7", tlv=b"\x04\x00\x03abc"))
        assert await relay_attempt(client) == (554, 250)
        await client.close()


async def test_untrusted_source_missing_or_bad_header_is_dropped(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level("INFO", logger="relay.front")
    async with running_front(proxied_config(tmp_path)) as front:
        before = {r: dropped("smtp", r) for r in ("untrusted_source", "missing", "invalid", "timeout")}
        # A spoofed header from an address that is not a trusted proxy: dropped unread.
        client = await connect(front, STRANGER, v1("127.0.0.9"))
        assert await client.closed()
        # The trusted proxy but no header (SMTP straight away): dropped, no banner.
        client = await connect(front, PROXY, b"EHLO client.test\r\n")
        assert await client.closed()
        # A malformed v1 header.
        client = await connect(front, PROXY, b"PROXY TCP4 300.1.1.1 127.0.0.1 1 25\r\n")
        assert await client.closed()
        # Silence: dropped after proxyProtocol.timeout.
        client = await connect(front, PROXY, b"")
        assert await client.closed(timeout=20)
        after = {r: dropped("smtp", r) for r in before}
        assert {r: after[r] - before[r] for r in before} == {
            "untrusted_source": 1,
            "missing": 1,
            "invalid": 1,
            "timeout": 1,
        }
        assert (
            f"connection from {STRANGER} dropped (listener smtp): not in proxyProtocol.trustedFrom"
            in caplog.text
        )
        assert front.stats.sessions == 0 or await _sessions_gone(front)


async def _sessions_gone(front: Front) -> bool:
    for _ in range(200):
        if front.stats.sessions == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_version_is_enforced(tmp_path: Path) -> None:
    async with running_front(proxied_config(tmp_path, version="v2")) as front:
        before = dropped("smtp", "version")
        client = await connect(front, PROXY, v1(OUTSIDE))
        assert await client.closed()
        assert dropped("smtp", "version") == before + 1
        client = await connect(front, PROXY, v2(OUTSIDE))
        assert await relay_attempt(client) == (554, 250)
        await client.close()


async def test_local_command_is_the_proxy_itself_and_never_trusted(tmp_path: Path) -> None:
    async with running_front(proxied_config(tmp_path)) as front:
        client = await connect(front, PROXY, v2("0.0.0.0", command=0))
        assert await relay_attempt(client) == (554, 250)  # 127.0.0.5 is in trustedNetworks
        await client.close()


async def test_per_client_limit_counts_the_announced_address(tmp_path: Path) -> None:
    async with running_front(proxied_config(tmp_path)) as front:
        first = await connect(front, PROXY, v1(OUTSIDE))
        assert (await first.reply())[0] == 220
        other = await connect(front, PROXY, v1("198.51.100.1"))
        assert (await other.reply())[0] == 220  # same proxy, another client: admitted
        again = await connect(front, PROXY, v1(OUTSIDE, port=40001))
        code, text = await again.reply()
        assert (code, text.split()[0]) == (421, "4.7.0")
        for client in (first, other, again):
            await client.close()


async def test_implicit_tls_behind_the_proxy(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    config = make_config(
        tmp_path,
        trustedNetworks=["127.0.0.0/8"],
        tls={"certFile": str(certs.cert_file), "keyFile": str(certs.key_file)},
        listeners=[
            {
                "name": "smtps",
                "host": "127.0.0.1",
                "port": 2465,
                "mode": "relay",
                "tls": "implicit",
                "proxyProtocol": {"trustedFrom": [f"{PROXY}/32"]},
            }
        ],
    )
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    async with running_front(config) as front:
        host, port = front.addresses["smtps"]
        # The header and the ClientHello in one segment, as a balancer sends them.
        reader, writer = await asyncio.open_connection(host, port, local_addr=(PROXY, 0))
        writer.write(v2(OUTSIDE))
        await writer.start_tls(context, server_hostname="localhost")
        client = RawClient(reader, writer)
        assert await relay_attempt(client) == (554, 250)
        await client.close()
