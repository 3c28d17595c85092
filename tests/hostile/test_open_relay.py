"""Open-relay probes from an untrusted, unauthenticated client: every trick that made some MTA
relay to a domain it does not serve. Each probe is its own session (sender: a normal address,
and the null sender); each recipient must be refused at RCPT with ``5.7.1`` (also the ones that
are not addresses at all, several unquoted ``@`` (RFC 5321 4.1.2): ``550 5.7.1``, refused as the
relay probes they are, not as typos), the DATA that follows must find no recipient, and nothing may
reach the victim's sink. The same probes from a trusted client are accepted (the policy, not
the parser, is what refuses them)."""

from __future__ import annotations

import pytest

from tests.faults.harness import RawSession, message_with_token, record_figures
from tests.hostile.conftest import UNTRUSTED, Hostile

PROBES = [
    "victim@victim.test",  # plain relaying
    "victim%victim.test@example.com",  # percent hack
    "victim.test!victim@example.com",  # bang path (UUCP)
    "@example.com:victim@victim.test",  # source route through us
    "@example.com,@other.test:victim@victim.test",  # longer source route
    '"victim@victim.test"@example.com',  # quoted local part hiding an address
    '"victim%victim.test"@example.com',
    '"victim!victim.test"@example.com',
    "victim@[127.0.0.1]",  # IP literals
    "victim@[127.0.0.2]",
    "victim@[IPv6:::1]",
    "victim@localhost",
    "postmaster@localhost",
    "victim@example.com.victim.test",  # suffix tricks
    "victim@victim.test.",
    "victim@xexample.com",
    "victim@EXAMPLE.COM.victim.test",
    "victim@victim.test@example.com",  # several @
    "victim@example.com@victim.test",
    "victim@victim.test%example.com",
]
SYNTAX_ERRORS = {
    "victim@victim.test@example.com",
    "victim@example.com@victim.test",
    "victim@victim.test%example.com",
}
REFUSED: dict[str, int] = {"probes": 0, "refused_5_7_1": 0, "not_an_address": 0, "accepted": 0}


@pytest.mark.parametrize("sender", ["sender@sender.test", ""], ids=["sender", "null-sender"])
@pytest.mark.parametrize("probe", PROBES)
def test_open_relay_probe_is_refused(hostile: Hostile, probe: str, sender: str) -> None:
    with RawSession.connect(hostile.port, source=UNTRUSTED) as s:
        assert s.reply()[0] == 220
        assert s.cmd("EHLO probe.test")[0] == 250
        assert s.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        code, text = s.cmd(f"RCPT TO:<{probe}>")
        REFUSED["probes"] += 1
        REFUSED["accepted"] += code == 250
        assert code in (550, 554) and text.split()[1] == "5.7.1", text
        REFUSED["refused_5_7_1"] += 1
        REFUSED["not_an_address"] += probe in SYNTAX_ERRORS
        assert s.cmd("DATA")[0] == 503  # no valid recipient: nothing can be queued
        s.send(message_with_token("open-relay") + b".\r\n")  # a client that ignores the 503
        s.send(b"QUIT\r\n")
        s.replies_until_closed()
    record_figures("hostile.open_relay", **REFUSED, victim_messages=len(hostile.victim.messages))


def test_the_same_probes_from_a_trusted_client_are_accepted(hostile: Hostile) -> None:
    with RawSession.connect(hostile.port, source="127.0.0.2") as s:
        assert s.reply()[0] == 220
        assert s.cmd("EHLO trusted.test")[0] == 250
        assert s.cmd("MAIL FROM:<sender@sender.test>")[0] == 250
        assert s.cmd("RCPT TO:<victim@victim.test>")[0] == 250
        assert s.cmd("RSET")[0] == 250


def test_nothing_reached_the_victim(hostile: Hostile) -> None:
    hostile.relay.wait_queue_empty(60)
    record_figures(
        "hostile.open_relay", **REFUSED, victim_messages=len(hostile.victim.messages), **hostile.health()
    )
    assert [m for m in hostile.victim.messages if m.token == "open-relay"] == []
    assert not any(m.token == "open-relay" for m in hostile.inbox.messages)
    assert hostile.relay.run.count("from=<attacker") == 0
    hostile.relay.assert_no_traceback()
