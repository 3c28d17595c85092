"""Interop with Postfix, software nobody here wrote, in both directions through one private
Postfix instance and one mailrelay process:

    smtplib -> Postfix --(STARTTLS)--> mailrelay -> sink       (user@in.test)
    smtplib -> mailrelay --(STARTTLS, verified)--> Postfix -> sink   (user@out.test)

Each message carries SMTPUTF8 addresses, an 8-bit body and RFC 3461 DSN parameters (NOTIFY,
ORCPT, RET, ENVID); the sink advertises DSN and records what it is given. Checked: exactly one
copy arrives, the body is byte-for-byte intact, the DSN parameters survive both hops, TLS was
used between the two MTAs, and each MTA added exactly one Received header."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import smtplib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.systems import PrivatePostfix, private_postfix_unavailable
from tests.doctor import require
from tests.faults.harness import Relay, record_figures, relay_config, relay_hop
from tests.relay.apphelp import free_port
from tests.relay.fronthelp import Certs, make_certs
from tests.relay.smtpsink import SmtpSink


@pytest.fixture(autouse=True)
def _postfix_here() -> None:
    """Postfix missing fails with the install hint (tests/doctor.py); only a machine where the
    tests do not run as root skips, saying so: a private Postfix master needs root."""
    require("postfix")
    reason = private_postfix_unavailable()
    if reason is not None:
        pytest.skip(f"no private Postfix: {reason}")


BODY = "Grüße aus Zürich: 8-bit body, not encoded.\r\n".encode()
SENDER = "josé@sender.test"  # a UTF-8 address: the transaction needs SMTPUTF8 (RFC 6531)


def message(token: str, rcpt: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: peer {token}\r\nX-Token: {token}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + BODY


@dataclass
class Peers:
    postfix: PrivatePostfix
    relay: Relay
    sink: SmtpSink
    certs: Certs


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[Peers]:
    sink = await SmtpSink(dsn=True).start()
    certs = make_certs(tmp_path)
    relay_port, postfix_port = free_port(), free_port()
    # Postfix's unprivileged processes need to reach their directories: pytest's are 0700.
    postfix_dir = Path(tempfile.mkdtemp(prefix="mailrelay-postfix-"))
    os.chmod(postfix_dir, 0o755)
    postfix = PrivatePostfix(
        postfix_dir,
        postfix_port,
        hostname="postfix.peers.test",
        transports={
            "in.test": f"smtp:[127.0.0.1]:{relay_port}",
            "out.test": f"smtp:[127.0.0.1]:{sink.port}",
        },
        cert_file=certs.cert_file,
        key_file=certs.key_file,
    )
    config = relay_config(
        tmp_path,
        smtp_port=relay_port,
        routes=[
            {
                "name": "in",
                "match": {"recipientDomains": ["in.test"]},
                "nextHop": relay_hop("sink", sink.port),
            },
            {
                "name": "out",
                "match": {"recipientDomains": ["out.test"]},
                "nextHop": {
                    "kind": "smarthost",
                    "host": "127.0.0.1",
                    "port": postfix_port,
                    "tls": "starttls",
                    "caFile": str(certs.ca_file),
                },
            },
        ],
        tls=certs.tls,
        hostname="relay.peers.test",
    )
    config["listeners"][0]["tls"] = "starttls"
    relay = Relay(tmp_path, config)
    try:
        await asyncio.to_thread(postfix.start)
        await relay.astart()
        yield Peers(postfix, relay, sink, certs)
    finally:
        print("----- postfix maillog -----\n" + postfix.maillog[-5000:])
        await asyncio.to_thread(postfix.stop)
        relay.stop()
        await sink.stop()
        shutil.rmtree(postfix_dir, ignore_errors=True)


def submit(port: int, rcpt: str, token: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.peers.test")
        client.sendmail(
            SENDER,
            [rcpt],
            message(token, rcpt),
            mail_options=["SMTPUTF8", "BODY=8BITMIME", "RET=HDRS", f"ENVID={token}-envid"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{rcpt}"],
        )


def received_headers(content: bytes) -> list[str]:
    head = content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    return [line for line in unfolded.split("\r\n") if line.lower().startswith("received:")]


async def until_arrived(sink: SmtpSink, token: str) -> None:
    async with asyncio.timeout(120):
        while not any(f"X-Token: {token}".encode() in m.content for m in sink.messages):
            sink.arrived.clear()
            await sink.arrived.wait()


async def test_postfix_relays_into_mailrelay_and_mailrelay_into_postfix(peers: Peers) -> None:
    rcpt_in, rcpt_out = "user@in.test", "user@out.test"
    await asyncio.to_thread(submit, peers.postfix.port, rcpt_in, "via-postfix")
    await asyncio.to_thread(submit, peers.relay.port, rcpt_out, "via-mailrelay")
    await until_arrived(peers.sink, "via-postfix")
    await until_arrived(peers.sink, "via-mailrelay")
    await asyncio.to_thread(peers.relay.wait_queue_empty, 60)
    peers.relay.run.signal(signal.SIGTERM)
    assert await asyncio.to_thread(peers.relay.run.wait, 30) == 0

    by_token = {}
    for received in peers.sink.messages:
        token = re.search(rb"X-Token: (\S+)", received.content)
        assert token is not None
        by_token.setdefault(token.group(1).decode(), []).append(received)
    record_figures(
        "peers.postfix",
        sent=2,
        delivered=sum(len(v) for v in by_token.values()),
        duplicated=sum(len(v) - 1 for v in by_token.values()),
        lost=2 - len(by_token),
    )
    assert sorted(by_token) == ["via-mailrelay", "via-postfix"]
    for token, rcpt in (("via-postfix", rcpt_in), ("via-mailrelay", rcpt_out)):
        [received] = by_token[token]
        assert received.rcpt_tos == [rcpt]
        assert received.mail_from == SENDER
        assert received.content.endswith(BODY)  # 8-bit body untouched through both MTAs
        assert "SMTPUTF8" in [o.upper() for o in received.mail_options]
        assert received.dsn_mail.get("ENVID") == f"{token}-envid" and received.dsn_mail.get("RET") == "HDRS"
        params = received.dsn_rcpt[rcpt]
        assert params["NOTIFY"].upper() == "SUCCESS,FAILURE"
        assert params["ORCPT"].lower() == f"rfc822;{rcpt}"
        trace = received_headers(received.content)
        assert len(trace) == 2, trace  # one per MTA (smtplib adds none)
        assert sum("(mailrelay)" in line for line in trace) == 1
        assert sum("(Postfix)" in line for line in trace) == 1

    postfix_to_relay = received_headers(by_token["via-postfix"][0].content)[0]
    assert "by relay.peers.test (mailrelay)" in postfix_to_relay
    assert re.search(r"with (UTF8SMTPS|ESMTPS) ", postfix_to_relay), postfix_to_relay  # STARTTLS (RFC 6531)
    relay_to_postfix = received_headers(by_token["via-mailrelay"][0].content)[0]
    assert "by postfix.peers.test (Postfix)" in relay_to_postfix
    assert re.search(r"with (UTF8SMTPS|ESMTPS) ", relay_to_postfix), relay_to_postfix  # STARTTLS, verified
    assert sum(peers.postfix.queued().values()) == 0
    peers.relay.assert_no_traceback()
