"""relay.core.dsn: which reports are owed (RFC 3461) and what the report looks like (RFC 3464)."""

from __future__ import annotations

import email
import email.message
import email.policy

import pytest

from relay.core import outcome
from relay.core.dsn import (
    FULL_RETURN_LIMIT,
    Report,
    action_for,
    as_xtext,
    build_dsn,
    envelope_for,
    is_xtext,
    reportable,
    xtext_decode,
    xtext_encode,
)
from relay.core.model import Envelope, QueueEntry, Recipient, RecipientOutcome

NOW = 1_700_000_100.0
CONTENT = b"From: s@sender.test\r\nTo: a@d.test\r\nSubject: hello\r\n\r\nbody text\r\n"


def entry(mail_from: str = "s@sender.test", **envelope: object) -> QueueEntry:
    rcpts = (Recipient("a@d.test"),)
    return QueueEntry(
        "Q1",
        Envelope(mail_from, rcpts, **envelope),
        1_700_000_000.0,
        rcpts,
        helo="client.test",
        client_address="127.0.0.9",  # type: ignore[arg-type]
    )


def bounced(notify: tuple[str, ...] = (), orcpt: str | None = None) -> RecipientOutcome:
    return outcome.from_reply(
        Recipient("a@d.test", notify, orcpt), 550, "5.1.1 unknown user", remote_mta="mx.d.test"
    )


def delivered(notify: tuple[str, ...] = (), relayed: bool = False) -> RecipientOutcome:
    return outcome.from_reply(
        Recipient("a@d.test", notify), 250, "2.0.0 ok", remote_mta="mx.d.test", relayed=relayed
    )


def deferred(notify: tuple[str, ...] = ()) -> RecipientOutcome:
    return outcome.from_reply(Recipient("a@d.test", notify), 451, "4.3.0 later", remote_mta="mx.d.test")


@pytest.mark.parametrize(
    ("result", "kwargs", "action"),
    [
        (bounced(), {}, "failed"),  # no NOTIFY: failures only
        (bounced(("FAILURE",)), {}, "failed"),
        (bounced(("SUCCESS",)), {}, None),
        (bounced(("NEVER",)), {}, None),
        (delivered(), {}, None),
        (delivered(("SUCCESS",)), {}, None),  # handed to a DSN-capable hop: it reports
        (delivered(("SUCCESS",), relayed=True), {}, "relayed"),
        (delivered(("SUCCESS",)), {"final_delivery": True}, "delivered"),
        (delivered(("FAILURE",), relayed=True), {}, None),
        (deferred(("DELAY",)), {}, None),
        (deferred(("DELAY",)), {"delay_warning": True}, "delayed"),
        (deferred(), {"delay_warning": True}, None),  # delays only when asked for
        (deferred(("NEVER",)), {"delay_warning": True}, None),
    ],
)
def test_action_for(result: RecipientOutcome, kwargs: dict[str, bool], action: str | None) -> None:
    assert action_for(result, **kwargs) == action


def test_never_a_report_about_mail_from_the_null_sender() -> None:
    assert reportable(Envelope("", ()), [bounced()]) == []
    with pytest.raises(ValueError):
        build_dsn(
            entry(""), CONTENT, [Report(bounced(), "failed")], reporting_mta="r.test", now=NOW, message_id="x"
        )


def parse(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def status_blocks(report: email.message.EmailMessage) -> list[dict[str, str]]:
    parts = list(report.iter_parts())
    payload = parts[1].get_payload()
    assert isinstance(payload, list)
    return [dict(block.items()) for block in payload]


def test_failed_report_fields() -> None:
    data = build_dsn(
        entry(envid="ENV+201"),
        CONTENT,
        [Report(bounced(orcpt="rfc822;A+2Bx@d.test"), "failed")],
        reporting_mta="relay.test",
        now=NOW,
        message_id="Q2.dsn",
    )
    assert data.isascii() and b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    report = parse(data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.test"
    assert report["Message-ID"] == "<Q2.dsn@relay.test>"
    assert report["Auto-Submitted"] == "auto-replied"
    assert [p.get_content_type() for p in report.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    per_message, per_recipient = status_blocks(report)
    assert per_message == {
        "Original-Envelope-Id": "ENV 1",
        "Reporting-MTA": "dns; relay.test",
        "Received-From-MTA": "dns; client.test ([127.0.0.9])",
        "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 GMT",
    }
    assert per_recipient == {
        "Original-Recipient": "rfc822;A+x@d.test",  # decoded from xtext (RFC 3461 6.3)
        "Final-Recipient": "rfc822;a@d.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.d.test",
        "Diagnostic-Code": "smtp; 550 5.1.1 unknown user",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:15:00 GMT",
    }
    human = next(iter(report.iter_parts())).get_content()
    assert "a@d.test" in human and "550 5.1.1 unknown user" in human
    returned = list(report.iter_parts())[2].get_content()
    assert returned["Subject"] == "hello"
    assert returned.get_content().strip() == "body text"


@pytest.mark.parametrize(
    ("ret", "size", "content_type"),
    [
        ("HDRS", 10, "text/rfc822-headers"),
        ("FULL", FULL_RETURN_LIMIT * 2, "message/rfc822"),
        (None, 10, "message/rfc822"),
        (None, FULL_RETURN_LIMIT + 1, "text/rfc822-headers"),
    ],
)
def test_returned_content_follows_ret(ret: str | None, size: int, content_type: str) -> None:
    content = CONTENT + b"x" * size + b"\r\n"
    data = build_dsn(
        entry(ret=ret),
        content,
        [Report(bounced(), "failed")],
        reporting_mta="r.test",
        now=NOW,
        message_id="m",
    )
    returned = list(parse(data).iter_parts())[2]
    assert returned.get_content_type() == content_type
    if content_type == "text/rfc822-headers":
        text = returned.get_content()
        assert "Subject: hello" in text and "xxxx" not in text


def test_delayed_report_has_will_retry_until() -> None:
    data = build_dsn(
        entry(),
        CONTENT,
        [Report(deferred(("DELAY",)), "delayed")],
        reporting_mta="r.test",
        now=NOW,
        message_id="m",
        retry_until=NOW + 86400,
    )
    report = parse(data)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    fields = status_blocks(report)[1]
    assert fields["Action"] == "delayed"
    assert fields["Status"] == "4.3.0"
    assert fields["Will-Retry-Until"] == "Wed, 15 Nov 2023 22:15:00 GMT"


def test_local_failure_has_no_remote_mta() -> None:
    local = outcome.bounced(Recipient("a@d.test"), "5.1.10", "null MX", code=556)
    fields = status_blocks(
        parse(
            build_dsn(
                entry(), CONTENT, [Report(local, "failed")], reporting_mta="r.test", now=NOW, message_id="m"
            )
        )
    )[1]
    assert "Remote-MTA" not in fields
    assert fields["Diagnostic-Code"] == "x-mailrelay; 556 5.1.10 null MX"


def test_dsn_envelope() -> None:
    envelope = envelope_for(entry(), b"ascii")
    assert envelope.mail_from == "" and [r.address for r in envelope.recipients] == ["s@sender.test"]
    assert envelope.body is None
    assert envelope_for(entry(), "é".encode()).body == "8BITMIME"


@pytest.mark.parametrize(
    ("value", "encoded"),
    [("abc", "abc"), ("a+b", "a+2Bb"), ("a=b", "a+3Db"), ("a b", "a+20b"), ("é", "+C3+A9"), ("", "")],
)
def test_xtext_round_trip(value: str, encoded: str) -> None:
    assert xtext_encode(value) == encoded
    assert is_xtext(encoded)
    assert xtext_decode(encoded) == value
    assert as_xtext(encoded) == encoded
    if value != encoded:
        assert as_xtext(value) == encoded
