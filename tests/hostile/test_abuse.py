"""Abuse limits that hold across worker processes and restarts (relay.abuse, relay.core.abuse),
on real sockets: failed AUTH spread over two real worker processes block the address, also
after a restart; the per-client connection limit counts every worker's connections; early
talkers are refused before the banner; too much mail from one address is cut off.

Which worker holds a connection is read from the kernel (/proc/net/tcp and the workers' file
descriptors), so the tests do not depend on how SO_REUSEPORT happens to spread them."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import ssl
from pathlib import Path
from typing import Any

from relay.abuse import AbuseStore
from tests.faults.harness import Relay, relay_config, relay_hop
from tests.relay.apphelp import free_port, http_get
from tests.relay.fronthelp import RawClient, make_certs, make_config, running_front, write_users

ATTACKER = "127.0.0.7"
BYSTANDER = "127.0.0.8"


def worker_pids(relay: Relay) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", relay.run.log)]


def _server_socket_inode(server_port: int, client_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if local_port == server_port and remote_port == client_port:
                    return fields[9]
    return None


def owner(pids: list[int], server_port: int, client: RawClient) -> int | None:
    """The worker pid whose descriptor holds the server side of `client`'s connection."""
    client_port = client.writer.get_extra_info("sockname")[1]
    inode = _server_socket_inode(server_port, client_port)
    if inode is None:
        return None
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


async def connected(port: int, source: str) -> tuple[RawClient, tuple[int, str]]:
    client = await RawClient.connect("127.0.0.1", port, local_addr=(source, 0))
    return client, await client.reply()


async def spread(relay: Relay, port: int, source: str, per_worker: int) -> list[RawClient]:
    """`per_worker` greeted connections from `source` held by each worker (surplus closed)."""
    pids = worker_pids(relay)
    assert len(pids) == 2, relay.run.log
    held: dict[int, list[RawClient]] = {pid: [] for pid in pids}
    for _ in range(200):
        if all(len(v) >= per_worker for v in held.values()):
            break
        client, (code, text) = await connected(port, source)
        if code == 421 and "Too many connections" in text:  # a surplus one not yet released
            await client.close()
            await asyncio.sleep(0.05)
            continue
        assert code == 220, text
        pid = owner(pids, port, client)
        if pid is not None and len(held[pid]) < per_worker:
            held[pid].append(client)
        else:
            await client.close()
    assert all(len(v) == per_worker for v in held.values()), "SO_REUSEPORT never reached both workers"
    return [client for clients in held.values() for client in clients]


def submission_relay(tmp_path: Path, **extra: Any) -> tuple[Relay, ssl.SSLContext, int]:
    certs = make_certs(tmp_path)
    users = write_users(tmp_path, {"alice": "wonderland"})
    smtp_port, submission_port = free_port(), free_port()
    config = relay_config(
        tmp_path,
        smtp_port=smtp_port,
        routes=[{"name": "all", "nextHop": relay_hop("nowhere", free_port())}],
        tls={"certFile": str(certs.cert_file), "keyFile": str(certs.key_file)},
        auth={"usersFile": str(users), "maxFailures": 3},
        submission_port=submission_port,
        workers=2,
        **extra,
    )
    relay = Relay(tmp_path, config)
    relay.start()
    relay.run.wait_for(r"ready \(pid", occurrences=2, timeout=60)
    return relay, ssl.create_default_context(cafile=str(certs.ca_file)), submission_port


async def fail_auth(client: RawClient, context: ssl.SSLContext, user: str) -> tuple[int, str]:
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("STARTTLS"))[0] == 220
    await client.writer.start_tls(context, server_hostname="localhost")
    assert (await client.cmd("EHLO client.test"))[0] == 250
    token = base64.b64encode(f"\0{user}\0wrong".encode()).decode()
    return await client.cmd(f"AUTH PLAIN {token}")


async def test_ten_failed_auths_spread_over_the_workers_block_the_address(tmp_path: Path) -> None:
    relay, context, port = submission_relay(tmp_path)
    try:
        clients = await spread(relay, port, ATTACKER, per_worker=5)
        replies = [await fail_auth(client, context, f"guess{n}") for n, client in enumerate(clients)]
        codes = [code for code, _ in replies]
        # Five failures on each worker: no session reached auth.maxFailures (3), and no worker
        # saw more than five, yet the tenth blocked the address.
        assert codes[:9] == [535] * 9, replies
        assert replies[9] == (
            421,
            "4.7.0 Too many authentication failures from your address, try again later",
        )
        for client in clients:
            await client.close()
        logged = re.findall(
            r"\[w(\d)\] relay\.front: session 127\.0\.0\.7: authentication failed", relay.run.log
        )
        assert sorted(set(logged)) == ["0", "1"], logged
        for _ in range(6):  # whichever worker takes it
            client, reply = await connected(port, ATTACKER)
            assert reply[0] == 421 and reply[1].startswith("4.7.0 Too many authentication failures"), reply
            assert await client.closed()
        client, reply = await connected(port, BYSTANDER)  # another address is not blocked
        assert reply[0] == 220
        await client.close()
        status, text = http_get(relay.config["metrics"]["port"], "/metrics")
        assert status == 200
        assert re.search(r'^mailrelay_abuse_blocks_total\{reason="auth_failures"\} 1\.0$', text, re.M), text
        assert re.search(r'^mailrelay_rejected_total\{reason="blocked"\} ([6-9]|\d\d)\.0$', text, re.M)

        # A restart remembers the block (the store is in the queue directory).
        relay.run.signal(signal.SIGTERM)
        assert relay.run.wait(timeout=60) == 0
        relay.start()
        relay.run.wait_for(r"ready \(pid", occurrences=2, timeout=60)
        client, reply = await connected(port, ATTACKER)
        assert reply[0] == 421, reply
        await client.close()
    finally:
        relay.stop()


async def test_connections_per_client_are_counted_over_all_workers(tmp_path: Path) -> None:
    relay, _context, port = submission_relay(tmp_path, limits={"maxConnectionsPerClient": 4})
    try:
        held = await spread(relay, port, ATTACKER, per_worker=2)
        for _ in range(4):  # the fifth is refused by whichever worker takes it
            client, reply = await connected(port, ATTACKER)
            assert reply == (421, "4.7.0 Too many connections from your address"), reply
            await client.close()
        other, reply = await connected(port, BYSTANDER)
        assert reply[0] == 220
        await other.close()
        await held.pop().close()
        for _ in range(100):  # the released slot is free again for any worker
            client, reply = await connected(port, ATTACKER)
            await client.close()
            if reply[0] == 220:
                break
            await asyncio.sleep(0.1)
        assert reply[0] == 220
        for client in held:
            await client.close()
    finally:
        relay.stop()


async def test_early_talkers_are_refused_before_the_banner(tmp_path: Path) -> None:
    config = make_config(tmp_path, trustedNetworks=["127.0.0.2/32"], abuse={"pregreetWait": "500ms"})
    async with running_front(config) as front:
        host, port = front.addresses["smtp"]
        talker = await RawClient.connect(host, port)
        await talker.send(b"EHLO spam.test\r\n")
        assert await talker.reply() == (554, "5.5.1 Protocol error: you talked before the greeting")
        assert await talker.closed()
        patient = await RawClient.connect(host, port, local_addr=("127.0.0.3", 0))
        assert (await patient.reply())[0] == 220
        await patient.close()
        # Once passed, an address is not tested again (the pass is in the shared store).
        again = await RawClient.connect(host, port, local_addr=("127.0.0.3", 0))
        await again.send(b"EHLO early.test\r\n")
        assert (await again.reply())[0] == 220
        assert (await again.reply())[0] == 250
        await again.close()
        trusted = await RawClient.connect(host, port, local_addr=("127.0.0.2", 0))
        await trusted.send(b"EHLO inside.test\r\n")
        assert (await trusted.reply())[0] == 220
        await trusted.close()
        # The talker is still refused: a refusal is no pass.
        talker = await RawClient.connect(host, port)
        await talker.send(b"EHLO spam.test\r\n")
        assert (await talker.reply())[0] == 554


async def test_too_much_mail_from_one_address_is_cut_off(tmp_path: Path) -> None:
    config = make_config(tmp_path, abuse={"messages": 2, "window": "1h"})
    async with running_front(config) as front:
        host, port = front.addresses["smtp"]
        client = await RawClient.connect(host, port)
        assert (await client.reply())[0] == 220
        assert (await client.cmd("EHLO client.test"))[0] == 250
        for _ in range(2):
            assert (await client.cmd("MAIL FROM:<a@sender.org>"))[0] == 250
            assert (await client.cmd("RSET"))[0] == 250
        assert await client.cmd("MAIL FROM:<a@sender.org>") == (
            421,
            "4.7.0 Too much mail from your address, try again later",
        )
        assert await client.closed()


def test_store_survives_a_broken_file_and_forgets_dead_workers(tmp_path: Path) -> None:
    (tmp_path / "abuse.sqlite3").write_bytes(b"this is not a database" * 100)
    store = AbuseStore(tmp_path)
    assert list(tmp_path.glob("abuse.sqlite3.broken-*"))
    limits = make_config(tmp_path).limits
    abuse = make_config(tmp_path).abuse
    assert store.connect("192.0.2.1", trusted=False, limits=limits, abuse=abuse) is None
    # Rows of a process that no longer exists (a killed worker) are dropped by the next opener.
    store._db.execute("INSERT INTO live (pid, client, n) VALUES (?, '192.0.2.1', 7)", (2**22 + 12345,))
    assert store.live("192.0.2.1") == 8
    other = AbuseStore(tmp_path)
    assert other.live("192.0.2.1") == 0  # the same pid reopened: its own rows go too
    store.close()
    other.close()


def test_store_that_cannot_be_made_counts_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = AbuseStore(blocker)
    abuse = make_config(tmp_path, abuse={"authFailures": 2}).abuse
    assert store.auth_failed("192.0.2.9", abuse) is False
    assert store.auth_failed("192.0.2.9", abuse) is True
    assert store.blocked("192.0.2.9")
    store.close()
