"""relay.smtp_transaction: what one transaction sends (`prepare`) and what the replies mean
(`interpret`), as tables of plain values; relay/test_delivery.py runs them against real servers."""

from __future__ import annotations

import dataclasses
import email
import email.message
import email.policy
from collections.abc import Sequence
from typing import Any

import pytest

from relay.core.model import DeliveryRequest, Disposition, Envelope, Message, QueueEntry, Recipient
from relay.smtp_client import ServerReply, SmtpConnectionLost, TransactionReplies
from relay.smtp_transaction import (
    Prepared,
    TransactionError,
    Verdict,
    downgrade_8bit,
    failure_outcome,
    interpret,
    orcpt_param,
    prepare,
)

CONTENT = b"From: s@sender.test\r\nSubject: hi\r\n\r\nhello\r\n.dot\r\n"


def request(
    recipients: Sequence[str | Recipient] = ("a@d.test",), content: bytes = CONTENT, **envelope: Any
) -> DeliveryRequest:
    rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
    envelope.setdefault("mail_from", "s@sender.test")
    entry = QueueEntry("Q1", Envelope(recipients=rcpts, **envelope), 0.0, rcpts)
    return DeliveryRequest(Message(entry, content), rcpts)


def server(*extensions: str) -> Any:
    offered = {e.lower() for e in extensions}
    return lambda keyword: keyword in offered


def prepared(req: DeliveryRequest, *extensions: str) -> Prepared:
    result = prepare(req, server(*extensions), label="mx.test:25", remote="mx.test")
    assert isinstance(result, Prepared)
    return result


def R(code: int, text: str = "ok") -> ServerReply:
    return ServerReply(code, text)


# --------------------------------------------------------------------------- prepare


@pytest.mark.parametrize(
    ("extensions", "envelope", "content", "mail", "rcpt"),
    [
        ((), {}, CONTENT, b"MAIL FROM:<s@sender.test>\r\n", b"RCPT TO:<a@d.test>\r\n"),
        (
            ("SIZE",),
            {},
            CONTENT,
            b"MAIL FROM:<s@sender.test> SIZE=%d\r\n" % len(CONTENT),
            b"RCPT TO:<a@d.test>\r\n",
        ),
        (
            ("8BITMIME",),
            {},
            "Subject: x\r\n\r\ncafé\r\n".encode(),
            b"MAIL FROM:<s@sender.test> BODY=8BITMIME\r\n",
            b"RCPT TO:<a@d.test>\r\n",
        ),
        (("8BITMIME",), {"body": "8BITMIME"}, CONTENT, b"MAIL FROM:<s@sender.test> BODY=8BITMIME\r\n", None),
        (
            ("DSN",),
            {"ret": "HDRS", "envid": "e+1"},
            CONTENT,
            b"MAIL FROM:<s@sender.test> RET=HDRS ENVID=e+2B1\r\n",
            None,
        ),
        (
            (),
            {"ret": "HDRS", "envid": "e1"},
            CONTENT,
            b"MAIL FROM:<s@sender.test>\r\n",
            None,
        ),  # no DSN: not passed
        (
            ("SMTPUTF8", "8BITMIME"),
            {"smtputf8": True, "mail_from": "jörg@sender.test"},
            CONTENT,
            "MAIL FROM:<jörg@sender.test> SMTPUTF8\r\n".encode(),
            None,
        ),
    ],
)
def test_prepare_mail_and_rcpt_lines(
    extensions: tuple[str, ...], envelope: dict[str, Any], content: bytes, mail: bytes, rcpt: bytes | None
) -> None:
    result = prepared(request(content=content, **envelope), *extensions)
    assert result.mail == mail
    if rcpt is not None:
        assert result.rcpts == [rcpt]
    assert result.dsn is ("DSN" in extensions)


def test_prepare_rcpt_dsn_parameters_only_when_the_server_has_dsn() -> None:
    rcpt = Recipient("a@d.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;a+2Bb@d.test")
    with_dsn = prepared(request([rcpt]), "DSN")
    assert with_dsn.rcpts == [b"RCPT TO:<a@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@d.test\r\n"]
    assert prepared(request([rcpt])).rcpts == [b"RCPT TO:<a@d.test>\r\n"]


def test_prepare_payload_is_stuffed_with_a_final_crlf_and_dot() -> None:
    assert prepared(request(content=b"a\r\n.b")).payload == b"a\r\n..b\r\n.\r\n"


def test_prepare_trusts_the_fronts_check_of_the_stored_content_only() -> None:
    """An entry marked wire_ready (the front checked the content on arrival) is sent without
    another scan: here the mark is false on purpose, and the dot line goes out unstuffed,
    which shows the scan was skipped. A body converted for the server is checked again."""

    def marked(req: DeliveryRequest) -> DeliveryRequest:
        entry = dataclasses.replace(req.message.entry, wire_ready=True)
        return dataclasses.replace(req, message=Message(entry, req.message.content))

    assert prepared(marked(request(content=b"a\r\n.b\r\n")), "8BITMIME").payload == b"a\r\n.b\r\n.\r\n"
    assert prepared(request(content=b"a\r\n.b\r\n"), "8BITMIME").payload == b"a\r\n..b\r\n.\r\n"
    eight_bit = marked(request(content="Subject: x\r\n\r\ncaf\u00e9\r\n.b\r\n".encode()))
    converted = prepared(eight_bit).payload  # no 8BITMIME: converted, then stuffed
    assert converted.isascii() and converted.endswith(b"\r\n.\r\n")
    assert b"\r\n.b" not in converted


@pytest.mark.parametrize(
    ("envelope", "content", "extensions", "status", "code"),
    [
        ({"smtputf8": True, "mail_from": "jörg@sender.test"}, CONTENT, ("8BITMIME",), "5.6.7", 553),
        ({"smtputf8": True}, "Subject: ü\r\n\r\nx\r\n".encode(), ("8BITMIME",), "5.6.7", 553),
        ({}, "Subject: ü\r\n\r\nx\r\n".encode(), (), "5.6.3", 554),  # 8-bit header: no conversion
    ],
)
def test_prepare_bounces_what_the_server_cannot_take(
    envelope: dict[str, Any], content: bytes, extensions: tuple[str, ...], status: str, code: int
) -> None:
    result = prepare(
        request(["a@d.test", "b@d.test"], content, **envelope), server(*extensions), label="L", remote="mx"
    )
    assert isinstance(result, Verdict)
    assert result.after == "reuse" and result.error is None  # nothing sent: the session is as it was
    assert [(o.disposition, o.status, o.code, o.remote_mta) for o in result.results.values()] == [
        (Disposition.BOUNCED, status, code, "mx")
    ] * 2


def test_prepare_converts_an_8bit_body_for_a_server_without_8bitmime() -> None:
    result = prepared(request(content="Subject: x\r\n\r\ncafé\r\n".encode()))
    assert result.payload.isascii() and b"BODY=8BITMIME" not in result.mail


def test_prepare_never_puts_a_control_character_on_the_wire() -> None:
    result = prepare(request(["a\r\nRSET@d.test"]), server(), label="L", remote="mx")
    assert isinstance(result, Verdict) and result.after == "drop"
    assert result.error is not None and (result.error.code, result.error.status) == (553, "5.1.3")


# --------------------------------------------------------------------------- interpret


def replies(
    mail: ServerReply | None,
    rcpts: Sequence[ServerReply] = (),
    data: ServerReply | None = None,
    final: ServerReply | None = None,
    *,
    sent: bool = False,
) -> TransactionReplies:
    return TransactionReplies(mail, list(rcpts), data, final, sent)


TWO = request(["a@d.test", "b@d.test"])
LOST = SmtpConnectionLost("connection lost")


@pytest.mark.parametrize(
    ("answered", "failure", "connected", "dsn", "results", "error", "after"),
    [
        # all accepted, 250 after the dot: delivered, relayed without DSN at the server
        (
            replies(R(250), [R(250), R(251)], R(354), R(250, "2.0.0 queued"), sent=True),
            None,
            True,
            False,
            {0: ("delivered", "2.0.0", True), 1: ("delivered", "2.0.0", True)},
            None,
            "reuse",
        ),
        (
            replies(R(250), [R(250), R(250)], R(354), R(250), sent=True),
            None,
            True,
            True,
            {0: ("delivered", "2.0.0", False), 1: ("delivered", "2.0.0", False)},
            None,
            "reuse",
        ),
        # per-recipient RCPT replies; the final reply for the accepted one
        (
            replies(R(250), [R(550, "5.1.1 no such user"), R(250)], R(354), R(452, "4.3.1 full"), sent=True),
            None,
            True,
            False,
            {0: ("bounced", "5.1.1", False), 1: ("deferred", "4.3.1", False)},
            None,
            "reuse",
        ),
        # every RCPT refused: no content, RSET before reuse (or drop when the exchange broke)
        (
            replies(R(250), [R(550), R(450)], R(554)),
            None,
            True,
            False,
            {0: ("bounced", "5.0.0", False), 1: ("deferred", "4.0.0", False)},
            None,
            "rset",
        ),
        (
            replies(R(250), [R(550), R(550)]),
            LOST,
            False,
            False,
            {0: ("bounced", "5.0.0", False), 1: ("bounced", "5.0.0", False)},
            None,
            "drop",
        ),
        # DATA refused: the transaction is still open at the server
        (
            replies(R(250), [R(250), R(250)], R(554, "5.6.0 no")),
            None,
            True,
            False,
            {0: ("bounced", "5.6.0", False), 1: ("bounced", "5.6.0", False)},
            None,
            "rset",
        ),
        (
            replies(R(250), [R(250), R(250)], R(421, "4.3.2 bye")),
            None,
            False,
            False,
            {0: ("deferred", "4.3.2", False), 1: ("deferred", "4.3.2", False)},
            None,
            "drop",
        ),
        # the session ended early
        (replies(None), LOST, False, False, {}, (421, "4.4.2", True, True), "drop"),
        (replies(R(421, "4.3.2 closing")), None, False, False, {}, (421, "4.3.2", False, True), "drop"),
        (replies(R(550, "5.7.1 go away")), None, True, False, {}, (550, "5.7.1", False, False), "drop"),
        (
            replies(R(250), [R(550)]),
            LOST,
            False,
            False,
            {0: ("bounced", "5.0.0", False)},
            (421, "4.4.2", True, False),
            "drop",
        ),
        (
            replies(R(250), [R(250), R(250)], R(354), sent=True),
            LOST,
            False,
            False,
            {},
            (421, "4.4.2", True, False),
            "drop",
        ),
        (replies(R(250), [R(250), R(250)]), LOST, False, False, {}, (421, "4.4.2", True, False), "drop"),
    ],
)
def test_interpret(
    answered: TransactionReplies,
    failure: Exception | None,
    connected: bool,
    dsn: bool,
    results: dict[int, tuple[str, str, bool]],
    error: tuple[int, str, bool, bool] | None,
    after: str,
) -> None:
    plan = Prepared(b"MAIL\r\n", [b"RCPT\r\n"] * 2, b".\r\n", dsn)
    verdict = interpret(
        plan, TWO.recipients, answered, failure=failure, connected=connected, remote="mx.test"
    )
    got = {i: (o.disposition.value, o.status, o.relayed) for i, o in verdict.results.items()}
    assert got == results
    assert all(o.remote_mta == "mx.test" for o in verdict.results.values())
    if error is None:
        assert verdict.error is None
    else:
        assert verdict.error is not None
        assert (
            verdict.error.code,
            verdict.error.status,
            verdict.error.broken,
            verdict.error.before_mail,
        ) == error
    assert verdict.after == after


def test_interpret_names_the_step_that_failed() -> None:
    plan = Prepared(b"MAIL\r\n", [b"RCPT\r\n"], b".\r\n", False)
    one = request(["a@d.test"]).recipients
    cases = [
        (replies(None), "MAIL failed: connection lost"),
        (replies(R(250), [R(250)]), "DATA failed: connection lost"),
        (replies(R(250), [R(250)], R(354), sent=True), "the reply to the final dot failed: connection lost"),
    ]
    for answered, text in cases:
        verdict = interpret(plan, one, answered, failure=LOST, connected=False, remote="mx")
        assert verdict.error is not None and verdict.error.text == text


@pytest.mark.parametrize(
    ("error", "disposition", "status", "code"),
    [
        (TransactionError(421, "4.4.1", "connection to x failed: refused"), "deferred", "4.4.1", 421),
        (TransactionError(421, "4.4.2", "greeting failed", broken=True), "deferred", "4.4.2", 421),
        (TransactionError(454, "4.7.8", "authentication failed"), "deferred", "4.7.8", 454),
        (TransactionError(553, "5.1.3", "address cannot be sent"), "bounced", "5.1.3", 553),
    ],
)
def test_failure_outcome(error: TransactionError, disposition: str, status: str, code: int) -> None:
    result = failure_outcome(Recipient("a@d.test"), error, "mx.test")
    assert (result.disposition.value, result.status, result.code, result.remote_mta) == (
        disposition,
        status,
        code,
        "mx.test",
    )


# --------------------------------------------------------------------------- content helpers


def test_orcpt_param() -> None:
    assert orcpt_param("rfc822;a+2Bb@d.test") == "ORCPT=rfc822;a+2Bb@d.test"  # wire form kept
    assert orcpt_param("rfc822;a+b@d.test") == "ORCPT=rfc822;a+2Bb@d.test"  # not xtext: encoded
    assert orcpt_param("a@d.test") == "ORCPT=rfc822;a@d.test"


def test_downgrade_multipart_keeps_ascii_parts() -> None:
    content = (
        b"From: s@sender.test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n\xff\xfe\x00data\r\n"
        b"--b--\r\n"
    )
    converted = downgrade_8bit(content)
    assert converted is not None and converted.isascii()
    parsed = email.message_from_bytes(converted, policy=email.policy.default)
    parts = list(parsed.iter_parts())
    assert parts[0].get_content() == "plain ascii"
    assert parts[1]["Content-Transfer-Encoding"] == "base64"
    assert parts[1].get_content() == b"\xff\xfe\x00data"


def test_downgrade_non_mime_message_gets_mime_headers() -> None:
    converted = downgrade_8bit("Subject: x\r\n\r\ncafé\r\n".encode())
    assert converted is not None and converted.isascii()
    parsed = email.message_from_bytes(converted, policy=email.policy.compat32)
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_payload(decode=True) == "café\r\n".encode()
