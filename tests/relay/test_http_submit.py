"""relay.core.http_submit: tokens, sender patterns, bodies and the DATA rules (table tests)."""

from __future__ import annotations

import pytest

from relay.core import status
from relay.core.http_submit import (
    FieldError,
    authorize,
    decode_content,
    json_submission,
    parse_tokens,
    raw_submission,
    recipient_answer,
)
from relay.core.smtp_data import DataDecoder

TOKENS = """
# clients of the HTTP API
billing  s3cr3t-billing  *@billing.example.com,alerts@example.com
ops      s3cr3t-ops-0001 *
"""


def test_tokens_and_sender_patterns() -> None:
    billing, ops = parse_tokens(TOKENS)
    assert billing.name == "billing" and billing.senders == ("*@billing.example.com", "alerts@example.com")
    assert authorize((billing, ops), "Bearer s3cr3t-billing") is billing
    assert authorize((billing, ops), "bearer  s3cr3t-ops-0001 ") is ops
    for header in (None, "", "Bearer", "Bearer wrong-token", "Basic s3cr3t-billing", "s3cr3t-billing"):
        assert authorize((billing, ops), header) is None
    assert billing.may_send_as("Invoices@Billing.Example.com")
    assert billing.may_send_as("alerts@example.com")
    assert not billing.may_send_as("ceo@example.com")
    assert not billing.may_send_as("x@evil-billing.example.com.attacker.test")
    # the same matcher as the users file's senders: a domain pattern is a name or *.name, never a
    # substring (fnmatch let `*@*example.com` match evil-example.com)
    (partners,) = parse_tokens("partners s3cr3t-partner *@*.example.com")
    assert partners.may_send_as("a@mail.example.com")
    assert not partners.may_send_as("a@evil-example.com")
    assert not partners.may_send_as("a@example.com.evil.test")
    assert ops.may_send_as("anyone@anywhere.test")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("billing s3cr3t-billing", "line 1: use 'NAME TOKEN"),
        ("billing short *", "shorter than 8"),
        ("a s3cr3t-aaaa *\na s3cr3t-bbbb *", "line 2: client 'a' appears twice"),
        ("a s3cr3t-aaaa ,", "no sender pattern"),
    ],
)
def test_malformed_tokens_name_the_line(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_tokens(text)


def smtp_decoded(content: bytes) -> DataDecoder:
    """What the SMTP front's decoder makes of `content` sent dot-stuffed over DATA."""
    decoder = DataDecoder(10_000)
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    decoder.feed((b"." + stuffed if stuffed.startswith(b".") else stuffed) + b".\r\n")
    return decoder


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"Subject: a\r\n\r\n.dot\r\n..two\r\n.\r\nend\r\n", None),
        (b".first line\r\n", None),
        (b"bare\nlf\rcr\r\n", None),
        (b"no final newline", None),
        (b"nul \x00\r\n", status.DATA_NUL),
        (b"x" * 999 + b"\r\n", status.DATA_LINE_TOO_LONG),
        (b"y\r\n" * 4000, status.SIZE_EXCEEDED),
    ],
)
def test_content_follows_the_smtp_data_rules(content: bytes, problem: object) -> None:
    decoder = decode_content(content, 10_000)
    assert decoder.problem is problem
    if problem is None:
        normal = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        normal = normal if normal.endswith(b"\r\n") else normal + b"\r\n"
        assert decoder.content() == normal == smtp_decoded(normal).content()


def test_json_bodies_name_the_field_at_fault() -> None:
    submission = json_submission({"from": "a@b.test", "to": "c@d.test", "bcc": ["e@d.test"], "text": "hi"})
    assert submission.mail_from == "a@b.test" and submission.recipients == ("c@d.test", "e@d.test")
    assert b"e@d.test" not in submission.content
    for body, field in [
        ([], "(body)"),
        ({"to": "c@d.test"}, "from"),
        ({"from": "a@b.test"}, "to"),
        ({"from": "a@b.test", "to": 5}, "to"),
        ({"from": "a@b.test", "cc": ["x y"]}, "cc"),
        ({"from": "a@b.test", "to": "c@d.test", "subject": "two\nlines"}, "subject"),
        ({"from": "a@b.test", "to": "c@d.test", "headers": {"Bad Name": "x"}}, "headers"),
        (
            {"from": "a@b.test", "to": "c@d.test", "attachments": [{"filename": "a"}]},
            "attachments[0].contentBase64",
        ),
        ({"from": "a@b.test", "to": "c@d.test", "attachments": {}}, "attachments"),
        ({"from": "a@b.test", "to": "c@d.test", "extra": 1}, "extra"),
    ]:
        with pytest.raises(FieldError) as refused:
            json_submission(body)
        assert refused.value.field == field, (body, refused.value)


def test_raw_bodies_take_the_envelope_from_the_request_or_the_message() -> None:
    message = b"From: a@b.test\r\nTo: c@d.test\r\nBcc: e@d.test\r\n\r\nbody\r\n"
    from_message = raw_submission(message, mail_from=None, recipients=None)
    assert from_message.mail_from == "a@b.test" and from_message.recipients == ("c@d.test", "e@d.test")
    assert b"Bcc" not in from_message.content
    given = raw_submission(message, mail_from="bounce@b.test", recipients="x@d.test, y@d.test")
    assert given.mail_from == "bounce@b.test" and given.recipients == ("x@d.test", "y@d.test")
    for body, sender, rcpts, field in [
        (b"", None, None, "(body)"),
        (b"To: c@d.test\r\n\r\nx\r\n", None, None, "From"),
        (b"From: a@b.test\r\n\r\nx\r\n", None, None, "To"),
        (message, "not an address", None, "X-Mailrelay-From"),
        (message, None, "not an address", "X-Mailrelay-To"),
    ]:
        with pytest.raises(FieldError) as refused:
            raw_submission(body, mail_from=sender, recipients=rcpts)
        assert refused.value.field == field, (body, refused.value)


def test_recipient_answers_carry_the_smtp_reply() -> None:
    assert recipient_answer("a@b.test", status.RECIPIENT_OK) == {
        "address": "a@b.test",
        "status": "accepted",
        "code": 250,
        "enhanced": "2.1.5",
        "text": "Recipient OK",
    }
    assert recipient_answer("a@b.test", "550 no enhanced code")["enhanced"] == ""
    assert recipient_answer("a@b.test", status.NO_ROUTE)["status"] == "refused"
