"""SMTP smuggling (SEC Consult 2023, CVE-2023-51764/51765/51766 family): a client hides a second
message behind an end-of-data sequence that one MTA takes for the end and another does not.

Every published variant is sent from an untrusted client (to an accepted domain) and from a
trusted one (which may relay anywhere), with a complete second transaction behind it and the
real ``<CRLF>.<CRLF>`` at the very end, all in one write. The relay must answer exactly once
for the DATA (250, or a refusal such as 554 for NUL), never run the hidden commands, and what
reaches the next hop must be one message with nothing but CRLF line endings -- so no next hop,
however lenient, can find a second message in it."""

from __future__ import annotations

import pytest

from tests.faults.harness import RawSession, message_with_token, record_figures
from tests.hostile.conftest import TRUSTED, UNTRUSTED, Hostile

# (name, bytes that some MTA somewhere took for the end of the data)
VARIANTS = [
    ("lf-dot-lf", b"\n.\n"),
    ("cr-dot-cr", b"\r.\r"),
    ("lf-dot-crlf", b"\n.\r\n"),
    ("cr-dot-crlf", b"\r.\r\n"),
    ("crlf-dot-lf", b"\r\n.\n"),
    ("crlf-dot-cr", b"\r\n.\r"),
    ("lf-dot-cr", b"\n.\r"),
    ("cr-dot-lf", b"\r.\n"),
    ("crlf-nul-dot-crlf", b"\r\n\x00.\r\n"),
    ("crlf-dot-nul-crlf", b"\r\n.\x00\r\n"),
    ("crlf-dot-cr-nul-lf", b"\r\n.\r\x00\n"),
    ("lf-nul-dot-lf", b"\n\x00.\n"),
    ("crcrlf-dot-crcrlf", b"\r\r\n.\r\r\n"),
    ("crlf-dot-crcrlf", b"\r\n.\r\r\n"),
    ("lflf-dot-lflf", b"\n\n.\n\n"),
    ("crlf-space-dot-crlf", b"\r\n .\r\n"),
    ("crlf-dot-space-crlf", b"\r\n. \r\n"),
    ("crlf-dotdot-crlf", b"\r\n..\r\n"),
]

RESULTS: dict[str, int] = {"sessions": 0, "answered_250": 0, "refused": 0, "second_messages": 0}


def clean_crlf(content: bytes) -> bool:
    stripped = content.replace(b"\r\n", b"")
    return b"\r" not in stripped and b"\n" not in stripped


@pytest.mark.parametrize("client", ["untrusted", "trusted"])
@pytest.mark.parametrize(("name", "end"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_smuggled_end_of_data_is_content(hostile: Hostile, client: str, name: str, end: bytes) -> None:
    token = f"outer-{client}-{name}"
    hidden = f"hidden-{client}-{name}"
    target = "user@example.com" if client == "untrusted" else f"{name}@victim.test"
    payload = (
        message_with_token(token, body=b"first message")
        + end
        + b"MAIL FROM:<attacker@evil.test>\r\n"
        + f"RCPT TO:<{target}>\r\n".encode()
        + b"DATA\r\n"
        + message_with_token(hidden, body=b"smuggled message")
        + b"\r\n.\r\n"
    )
    with RawSession.connect(hostile.port, source=UNTRUSTED if client == "untrusted" else TRUSTED) as s:
        assert s.reply()[0] == 220
        assert s.cmd("EHLO client.test")[0] == 250
        assert s.cmd("MAIL FROM:<sender@sender.test>")[0] == 250
        assert s.cmd("RCPT TO:<user@example.com>")[0] == 250
        assert s.cmd("DATA")[0] == 354
        s.send(payload)
        final = s.reply()
        s.send(b"QUIT\r\n")
        rest = s.replies_until_closed()
    RESULTS["sessions"] += 1
    # exactly one answer to the DATA, then the 221: the hidden commands were never commands
    assert [code for code, _ in rest] == [221], (final, rest)
    if final[0] == 250:
        RESULTS["answered_250"] += 1
        hostile.inbox.wait_tokens({token}, 60)
    else:
        RESULTS["refused"] += 1
        assert final[0] == 554 and b"\x00" in end, final  # NUL refuses the message (5.6.0)
    arrivals = [m for m in hostile.inbox.messages + hostile.victim.messages if m.token in (token, hidden)]
    second = [m for m in arrivals if m.token == hidden]
    RESULTS["second_messages"] += len(second)
    assert not second
    assert len(arrivals) == (1 if final[0] == 250 else 0)
    for message in arrivals:
        assert clean_crlf(message.content), message.content
        assert message.rcpt_tos == ["user@example.com"]
        assert b"smuggled message" in message.content  # the whole thing is one message's content
    record_figures("hostile.smtp_smuggling", variants=len(VARIANTS), **RESULTS)


def test_no_traceback_after_smuggling(hostile: Hostile) -> None:
    record_figures("hostile.smtp_smuggling", variants=len(VARIANTS), **RESULTS, **hostile.health())
    hostile.relay.assert_no_traceback()
    assert hostile.health()["crashes"] == 0
