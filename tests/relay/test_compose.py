"""relay.core.compose: message structure, attachments, envelope rules, .eml passthrough."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.core.compose import (
    Attachment,
    ComposeError,
    compose,
    guess_content_type,
    load_eml,
    parse_header_option,
)
from tests.relay import media

DATE = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)


def full_submission() -> tuple[bytes, tuple[str, ...], str]:
    submission = compose(
        mail_from="Alice Ärger <alice@example.org>",
        to=["Bob <bob@example.net>", "carol@example.net"],
        cc=["dave@example.com"],
        bcc=["eve@example.com", "bob@example.net"],
        subject="Holiday photos, songs and a clip",
        text="Hi all,\nsee the attachments.\n",
        html="<p>Hi all,<br>see the <b>attachments</b>.</p>\n",
        attachments=[
            Attachment("Straße am Meer.png", media.png()),
            Attachment("song.mp3", media.mp3()),
            Attachment("voice note.ogg", media.ogg()),
            Attachment("clip.mp4", media.mp4()),
        ],
        headers=[("X-Campaign", "spring")],
        date=DATE,
        message_id="<fixed.1@example.org>",
    )
    return submission.content, submission.recipients, submission.mail_from


def test_structure_is_mixed_with_alternative_and_typed_attachments() -> None:
    content, _, _ = full_submission()
    message, parts, types = media.mixed_parts(content)
    assert types == ["multipart/alternative", "image/png", "audio/mpeg", "audio/ogg", "video/mp4"]
    alternative = list(parts[0].iter_parts())
    assert [p.get_content_type() for p in alternative] == ["text/plain", "text/html"]
    assert alternative[0].get_content().replace("\r\n", "\n") == "Hi all,\nsee the attachments.\n"
    assert "<b>attachments</b>" in alternative[1].get_content()
    expected = [
        ("Straße am Meer.png", media.png()),
        ("song.mp3", media.mp3()),
        ("voice note.ogg", media.ogg()),
        ("clip.mp4", media.mp4()),
    ]
    for part, (name, data) in zip(parts[1:], expected, strict=True):
        assert part.get_content_disposition() == "attachment"
        assert part.get_filename() == name
        assert part.get_payload(decode=True) == data
        assert part["Content-Transfer-Encoding"] == "base64"
        assert "MIME-Version" not in part
    assert message["MIME-Version"] == "1.0"


def test_non_ascii_filename_uses_rfc2231_and_headers_stay_7bit() -> None:
    content, _, _ = full_submission()
    assert content.isascii()
    assert b"filename*=utf-8''Stra%C3%9Fe%20am%20Meer.png" in content
    assert b"From: Alice =?utf-8?q?=C3=84rger?= <alice@example.org>\r\n" in content
    assert media.parse(content)["From"] == "Alice Ärger <alice@example.org>"
    assert b"\r\n" in content and b"\n" not in content.replace(b"\r\n", b"")
    assert content.endswith(b"\r\n")


def test_bcc_is_in_the_envelope_only() -> None:
    content, recipients, sender = full_submission()
    assert sender == "alice@example.org"
    assert recipients == ("bob@example.net", "carol@example.net", "dave@example.com", "eve@example.com")
    message = media.parse(content)
    assert "Bcc" not in message
    assert b"eve@example.com" not in content
    assert message["To"] == "Bob <bob@example.net>, carol@example.net"
    assert message["Cc"] == "dave@example.com"


def test_date_message_id_and_extra_headers() -> None:
    content, _, _ = full_submission()
    message = media.parse(content)
    assert message["Date"] == "Fri, 14 Mar 2025 15:09:26 +0000"
    assert message["Message-ID"] == "<fixed.1@example.org>"
    assert message["X-Campaign"] == "spring"
    generated = media.parse(compose(mail_from="a@example.org", to=["b@example.net"], text="x").content)
    assert generated["Message-ID"].endswith("@example.org>") and generated["Date"]
    overridden = compose(
        mail_from="a@example.org",
        to=["b@example.net"],
        headers=[("Message-ID", "<mine@example.org>"), ("Date", "Mon, 1 Jan 2024 00:00:00 +0000")],
    )
    assert media.parse(overridden.content).get_all("Message-ID") == ["<mine@example.org>"]
    assert media.parse(overridden.content).get_all("Date") == ["Mon, 01 Jan 2024 00:00:00 +0000"]


def test_plain_text_message_is_a_single_part() -> None:
    submission = compose(mail_from="a@example.org", to=["b@example.net"], subject="Grüße", text="schön\n")
    message = media.parse(submission.content)
    assert message.get_content_type() == "text/plain"
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content().replace("\r\n", "\n") == "schön\n"
    assert message["Subject"] == "Grüße" and b"Subject: =?utf-8?" in submission.content
    assert not submission.smtputf8 and not submission.eight_bit


def test_non_ascii_addresses_need_smtputf8_and_use_utf8_headers() -> None:
    submission = compose(mail_from="jörg@exämple.org", to=["zoë@example.net"], subject="hi", text="x")
    assert submission.smtputf8
    assert submission.recipients == ("zoë@example.net",)
    assert "From: jörg@exämple.org\r\n".encode() in submission.content
    assert media.parse(submission.content)["Message-ID"].endswith("@xn--exmple-cua.org>")


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("photo.PNG", b"", "image/png"),
        ("photo.jpg", b"", "image/jpeg"),
        ("song.mp3", b"", "audio/mpeg"),
        ("voice.ogg", b"", "audio/ogg"),
        ("voice.opus", b"", "audio/ogg"),
        ("clip.mp4", b"", "video/mp4"),
        ("clip.webm", b"", "video/webm"),
        ("report.pdf", b"", "application/pdf"),
        ("notes.txt", b"", "text/plain"),
        ("archive.tar.gz", b"", "application/gzip"),
        ("noextension", media.png(), "image/png"),
        ("noextension", media.mp3(), "audio/mpeg"),
        ("noextension", media.ogg(), "audio/ogg"),
        ("noextension", media.mp4(), "video/mp4"),
        ("noextension", b"%PDF-1.7", "application/pdf"),
        ("noextension", b"\x00\x01 unknown", "application/octet-stream"),
    ],
)
def test_guess_content_type(name: str, data: bytes, expected: str) -> None:
    assert guess_content_type(name, data) == expected


def test_explicit_attachment_type_wins_and_message_types_are_kept_as_bytes() -> None:
    submission = compose(
        mail_from="a@example.org",
        to=["b@example.net"],
        attachments=[
            Attachment("data.bin", b"\x00\x01", content_type="application/x-custom"),
            Attachment("forwarded.eml", b"Subject: x\r\n\r\nbody\r\n"),
        ],
    )
    parts = list(media.parse(submission.content).iter_parts())
    assert [p.get_content_type() for p in parts[1:]] == ["application/x-custom", "application/octet-stream"]
    assert parts[2].get_payload(decode=True) == b"Subject: x\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"to": []}, "no recipients"),
        ({"to": ["not an address"]}, "is not a mail address"),
        ({"to": ["bob@example.net\r\nBcc: x@y"]}, "control character"),
        ({"mail_from": "a@example.org, b@example.org"}, "exactly one address"),
        ({"mail_from": ""}, "a sender is needed"),
        ({"subject": "hi\r\nBcc: x@example.com"}, "--subject"),
        ({"headers": [("Bcc", "x@example.com")]}, "--bcc"),
        ({"headers": [("Subject", "x")]}, "--subject"),
        ({"headers": [("Bad Name", "x")]}, "printable ASCII"),
        ({"attachments": [Attachment("../etc/passwd", b"")]}, "plain file name"),
    ],
)
def test_bad_input_raises_a_compose_error_that_says_what_to_do(
    kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"mail_from": "a@example.org", "to": ["b@example.net"], **kwargs}
    with pytest.raises(ComposeError, match=message):
        compose(**arguments)  # type: ignore[arg-type]


def test_parse_header_option() -> None:
    assert parse_header_option("X-Priority: 1 (Highest)") == ("X-Priority", "1 (Highest)")
    with pytest.raises(ComposeError, match="Name: value"):
        parse_header_option("no colon here")
    with pytest.raises(ComposeError, match="one line"):
        parse_header_option("X-A: b\nX-B: c")


EML = (
    b"Return-Path: <list@example.org>\r\n"
    b"From: List <list@example.org>\r\n"
    b"To: bob@example.net,\r\n"
    b"  Carol <carol@example.net>\r\n"
    b"Cc: dave@example.com\r\n"
    b"Subject: archived message\r\n"
    b"Message-ID: <archived.7@example.org>\r\n"
    b"\r\n"
    b"Body line one.\r\n"
    b".a line starting with a dot\r\n"
    b"\r\n"
)


def test_eml_passthrough_is_byte_exact_with_envelope_from_headers() -> None:
    submission = load_eml(EML)
    assert submission.content == EML
    assert submission.mail_from == "list@example.org"
    assert submission.recipients == ("bob@example.net", "carol@example.net", "dave@example.com")


def test_eml_envelope_overrides_and_sender_header() -> None:
    with_sender = EML.replace(b"Subject:", b"Sender: owner@example.org\r\nSubject:")
    assert load_eml(with_sender).mail_from == "owner@example.org"
    overridden = load_eml(EML, mail_from="bounce@example.org", recipients=["only@example.net"])
    assert (overridden.mail_from, overridden.recipients) == ("bounce@example.org", ("only@example.net",))
    assert overridden.content == EML


def test_eml_line_endings_become_crlf_and_bcc_fields_are_removed() -> None:
    unix = EML.replace(b"\r\n", b"\n").replace(b"Cc:", b"Bcc: hidden@example.com,\n  other@example.com\nCc:")
    submission = load_eml(unix)
    assert submission.content == EML
    assert submission.recipients[-2:] == ("hidden@example.com", "other@example.com")
    assert b"hidden" not in submission.content


def test_eml_without_sender_or_recipients_is_refused_with_advice() -> None:
    with pytest.raises(ComposeError, match="--from"):
        load_eml(b"To: bob@example.net\r\n\r\nx\r\n")
    with pytest.raises(ComposeError, match="--to"):
        load_eml(b"From: a@example.org\r\n\r\nx\r\n")
