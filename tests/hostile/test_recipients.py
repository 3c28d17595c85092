"""No backscatter: recipients of accepted domains are verified before 250 at RCPT, with a static
list (inline and a re-read file) and with a cached callout to a real next hop (an aiosmtpd
sink that knows its users); unknown ones get 550 5.1.1 at RCPT instead of a bounce later, and a
next hop that cannot answer gives 450 4.1.1. Real sockets throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from relay.core import recipients as rules
from relay.front import Front
from tests.relay.fronthelp import RawClient, make_config, running_front
from tests.relay.smtpsink import SmtpSink


async def rcpt_replies(front: Front, addresses: list[str], source: str = "127.0.0.1") -> list[str]:
    host, port = front.addresses["smtp"]
    client = await RawClient.connect(host, port, local_addr=(source, 0))
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<someone@sender.org>"))[0] == 250
    out = []
    for address in addresses:
        code, text = await client.cmd(f"RCPT TO:<{address}>")
        out.append(f"{code} {text.split()[0]}")
    await client.close()
    return out


async def test_unknown_recipients_are_refused_at_rcpt_with_the_list(tmp_path: Path) -> None:
    listed = tmp_path / "valid-recipients"
    listed.write_text("# the mailboxes of example.com\nbob@example.com\n")
    config = make_config(
        tmp_path,
        trustedNetworks=["127.0.0.2/32"],
        recipientChecks=[
            {
                "domains": ["example.com", "*.corp.example"],
                "recipients": ["alice@example.com", "*@*.corp.example"],
                "recipientsFile": str(listed),
            }
        ],
    )
    async with running_front(config) as front:
        assert await rcpt_replies(
            front,
            ["alice@example.com", "Bob@example.com", "carol@example.com", "x@a.corp.example", "postmaster"],
        ) == ["250 2.1.5", "250 2.1.5", "550 5.1.1", "250 2.1.5", "250 2.1.5"]
        # Trusted clients are held to the same list; other domains are not checked.
        assert await rcpt_replies(front, ["carol@example.com", "anyone@other.org"], source="127.0.0.2") == [
            "550 5.1.1",
            "250 2.1.5",
        ]
        # A changed file (a ConfigMap update) is read again.
        listed.write_text("bob@example.com\ncarol@example.com\n")
        for _ in range(100):
            if await rcpt_replies(front, ["carol@example.com"]) == ["250 2.1.5"]:
                break
            await asyncio.sleep(0.1)
        assert await rcpt_replies(front, ["carol@example.com", "dave@example.com"]) == [
            "250 2.1.5",
            "550 5.1.1",
        ]


async def test_unknown_recipients_are_refused_at_rcpt_with_the_callout(tmp_path: Path) -> None:
    sink = await SmtpSink(
        rcpt_replies={
            "ghost@example.com": "550 5.1.1 no such user",
            "busy@example.com": "451 4.3.0 try again later",
        }
    ).start()
    checks: list[dict[str, Any]] = [
        {"domains": ["example.com"], "recipients": ["vip@example.com"], "callout": {"timeout": "5s"}}
    ]
    config = make_config(
        tmp_path,
        recipientChecks=checks,
        routes=[
            {
                "name": "store",
                "nextHop": {"kind": "relay", "name": "store", "host": sink.host, "port": sink.port},
            }
        ],
    )
    try:
        async with running_front(config) as front:
            replies = await rcpt_replies(
                front, ["known@example.com", "ghost@example.com", "busy@example.com", "vip@example.com"]
            )
            assert replies == ["250 2.1.5", "550 5.1.1", "450 4.1.1", "250 2.1.5"]
            asked = sink.connections
            assert asked == 3  # one probe per unlisted recipient, none for the listed one
            assert sink.messages == []  # RCPT and no DATA
            # Answers are cached: no new probe, even with the next hop gone.
            await sink.stop()
            assert await rcpt_replies(front, ["known@example.com", "ghost@example.com"]) == [
                "250 2.1.5",
                "550 5.1.1",
            ]
            assert sink.connections == asked
            # A new recipient while the next hop cannot answer: 4xx, never 250 or 550.
            assert await rcpt_replies(front, ["new@example.com"]) == ["450 4.1.1"]
    finally:
        await sink.stop()


async def test_callout_to_an_explicit_host(tmp_path: Path) -> None:
    sink = await SmtpSink(host="127.0.0.3", rcpt_replies={"ghost@example.com": "550 5.1.1 no"}).start()
    config = make_config(
        tmp_path,
        recipientChecks=[{"domains": ["example.com"], "callout": {"host": sink.host, "port": sink.port}}],
    )
    try:
        async with running_front(config) as front:  # the route is MX: the callout names its host
            assert await rcpt_replies(front, ["a@example.com", "ghost@example.com"]) == [
                "250 2.1.5",
                "550 5.1.1",
            ]
    finally:
        await sink.stop()


def test_rules() -> None:
    config = make_config(
        Path("/nonexistent"),
        recipientChecks=[
            {"domains": ["example.com"], "recipients": ["a@example.com"]},
            {"domains": ["*.example.com"], "callout": {"host": "127.0.0.1"}},
        ],
    )
    checks = config.recipient_checks
    assert rules.check_for("x@example.com", checks) == 0
    assert rules.check_for("x@sub.example.com", checks) == 1
    assert rules.check_for("x@other.org", checks) is None
    assert rules.check_for("postmaster", checks) is None
    assert rules.static_verdict("A@example.com", checks[0], ()) == "valid"
    assert rules.static_verdict("b@example.com", checks[0], ("b@example.com",)) == "valid"
    assert rules.static_verdict("c@example.com", checks[0], ()) == "unknown"
    assert rules.static_verdict("PostMaster@example.com", checks[0], ()) == "valid"  # RFC 5321 4.5.1
    assert rules.static_verdict("c@sub.example.com", checks[1], ()) == "callout"
    assert rules.parse_recipients_file("# x\n a@b.c # note\n\n*@d.e\n") == ("a@b.c", "*@d.e")
    assert rules.callout_reply(250) is None and rules.callout_reply(251) is None
    assert str(rules.callout_reply(550)).startswith("550 5.1.1")
    assert str(rules.callout_reply(421)).startswith("450 4.1.1")
    assert str(rules.callout_reply(None)).startswith("450 4.1.1")
