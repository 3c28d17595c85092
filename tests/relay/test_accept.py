"""Table tests for relay.core.accept.prepare_message: the refusals after the final dot, the
trace header and submission headers on top of the content, and the queue entry."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pytest

from relay.core import status
from relay.core.accept import Arrival, Prepared, Refused, prepare_message
from relay.core.model import QueueEntry, Recipient
from relay.core.smtp_data import DataDecoder
from relay.core.smtp_payload import data_payload
from relay.core.smtp_syntax import MailParams

WHEN = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ARRIVAL = Arrival(
    client_ip="192.0.2.7",
    helo="client.test",
    esmtp=True,
    secure=False,
    tls=None,
    authenticated=False,
    submission=False,
    arrival=WHEN.timestamp(),
    when=WHEN,
)
PARAMS = MailParams(size=None, body="8BITMIME", smtputf8=False, ret="HDRS", envid="env1")
ONE = (Recipient("u@example.com", notify=("FAILURE",), orcpt="rfc822;u@example.com"),)
TWO = (Recipient("u@example.com"), Recipient("v@example.com"))


def decoded(content: bytes, max_size: int = 10_000) -> DataDecoder:
    decoder = DataDecoder(max_size)
    assert decoder.feed(content + b".\r\n") >= 0
    return decoder


def prepare(
    content: bytes,
    *,
    arrival: Arrival = ARRIVAL,
    recipients: tuple[Recipient, ...] = ONE,
    max_size: int = 10_000,
    max_hops: int = 3,
) -> Prepared | Refused:
    return prepare_message(
        decoded(content, max_size),
        queue_id="Q1",
        mail_from="a@sender.org",
        params=PARAMS,
        recipients=recipients,
        arrival=arrival,
        hostname="relay.test",
        max_hops=max_hops,
        new_token=lambda: "t0k3n",
    )


@pytest.mark.parametrize(
    ("content", "max_size", "expected"),
    [
        (b"Subject: x\r\n\r\nnul\x00here\r\n", 10_000, (status.DATA_NUL, "content")),
        (b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n", 10_000, (status.DATA_LINE_TOO_LONG, "content")),
        (b"Subject: x\r\n\r\n" + (b"z" * 70 + b"\r\n") * 40, 2048, (status.SIZE_EXCEEDED, "size")),
        (
            b"Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nloop\r\n",
            10_000,
            (status.TOO_MANY_HOPS, "loop"),
        ),
        (
            b"received: a\r\nRECEIVED: b\r\nReceived: c\r\n\r\nloop\r\n",
            10_000,
            (status.TOO_MANY_HOPS, "loop"),
        ),
    ],
)
def test_refusals(content: bytes, max_size: int, expected: tuple[status.Reply, str]) -> None:
    result = prepare(content, max_size=max_size)
    assert isinstance(result, Refused)
    assert (result.reply, result.reason) == expected


def test_the_hop_refusal_says_how_many_and_the_limit() -> None:
    result = prepare(b"Received: a\r\n" * 4 + b"\r\nx\r\n")
    assert isinstance(result, Refused)
    assert result.log == "message refused: 4 Received headers (limit 3)"


def test_one_hop_below_the_limit_is_accepted_with_one_more_received() -> None:
    result = prepare(b"Received: a\r\nReceived: b\r\n\r\nx\r\n")
    assert isinstance(result, Prepared)
    assert result.data.count(b"Received:") == 3 and result.data.startswith(b"Received: from client.test")


@pytest.mark.parametrize(
    ("changes", "recipients", "expected_lines"),
    [
        (
            {},
            ONE,
            [
                b"Received: from client.test ([192.0.2.7])",
                b"\tby relay.test (mailrelay) with ESMTP id Q1",
                b"\tfor <u@example.com>; Wed, 01 May 2024 12:00:00 +0000",
            ],
        ),
        (
            {"secure": True, "tls": "TLSv1.3 with cipher X (256/256 bits)", "authenticated": True},
            TWO,
            [
                b"Received: from client.test ([192.0.2.7])",
                b"\t(using TLSv1.3 with cipher X (256/256 bits))",
                b"\tby relay.test (mailrelay) with ESMTPSA id Q1",
                b"\t; Wed, 01 May 2024 12:00:00 +0000",  # several recipients: no "for"
            ],
        ),
        (
            {"esmtp": False, "helo": "", "client_ip": "2001:db8::1"},
            ONE,
            [
                b"Received: from unknown ([IPv6:2001:db8::1])",
                b"\tby relay.test (mailrelay) with SMTP id Q1",
                b"\tfor <u@example.com>; Wed, 01 May 2024 12:00:00 +0000",
            ],
        ),
    ],
)
def test_trace_header(
    changes: dict[str, object], recipients: tuple[Recipient, ...], expected_lines: list[bytes]
) -> None:
    content = b"Subject: hi\r\n\r\nbody\r\n"
    result = prepare(content, arrival=dataclasses.replace(ARRIVAL, **changes), recipients=recipients)
    assert isinstance(result, Prepared)
    assert result.data == b"\r\n".join(expected_lines) + b"\r\n" + content


@pytest.mark.parametrize(
    ("submission", "content", "added"),
    [
        (False, b"Subject: x\r\n\r\nb\r\n", b""),
        (
            True,
            b"Subject: x\r\n\r\nb\r\n",
            b"Date: Wed, 01 May 2024 12:00:00 +0000\r\nMessage-ID: <Q1.t0k3n@relay.test>\r\n",
        ),
        (
            True,
            b"Date: Tue, 30 Apr 2024 10:00:00 +0000\r\nSubject: x\r\n\r\nb\r\n",
            b"Message-ID: <Q1.t0k3n@relay.test>\r\n",
        ),
        (True, b"Message-Id: <m@x>\r\nSubject: x\r\n\r\nb\r\n", b"Date: Wed, 01 May 2024 12:00:00 +0000\r\n"),
        (True, b"Message-ID: <m@x>\r\nDate: Tue, 30 Apr 2024 10:00:00 +0000\r\n\r\nb\r\n", b""),
    ],
)
def test_submission_headers_only_on_submission_and_only_when_missing(
    submission: bool, content: bytes, added: bytes
) -> None:
    result = prepare(content, arrival=dataclasses.replace(ARRIVAL, submission=submission))
    assert isinstance(result, Prepared)
    received_end = result.data.index(b"; Wed, 01 May 2024 12:00:00 +0000\r\n") + 35
    assert result.data[received_end:] == added + content


def test_queue_entry() -> None:
    result = prepare(b"Subject: x\nbare\nline ends\n\r\n")
    assert isinstance(result, Prepared)
    entry = result.entry
    assert entry.queue_id == "Q1" and entry.arrival == WHEN.timestamp()
    assert entry.envelope.mail_from == "a@sender.org" and entry.envelope.recipients == ONE
    assert (entry.envelope.body, entry.envelope.smtputf8, entry.envelope.ret, entry.envelope.envid) == (
        "8BITMIME",
        False,
        "HDRS",
        "env1",
    )
    assert entry.pending == ONE and entry.results == () and entry.attempts == 0
    assert (entry.client_address, entry.helo) == ("192.0.2.7", "client.test")
    assert result.normalized is True
    assert result.data.endswith(b"Subject: x\r\nbare\r\nline ends\r\n\r\n")
    assert result.size == len(b"Subject: x\r\nbare\r\nline ends\r\n\r\n")
    assert entry.wire_ready is False  # normalised: not vouched for, delivery checks it again


@pytest.mark.parametrize(
    ("content", "ready"),
    [
        (b"Subject: x\r\n\r\nplain\r\n", True),
        (b"Subject: x\r\n\r\n..dot\r\n", False),  # unstuffed: delivery stuffs it again
        (b"Subject: x\r\n\r\nbare\nLF\r\n", False),
    ],
)
def test_queue_entry_says_whether_the_content_goes_out_as_it_is(content: bytes, ready: bool) -> None:
    result = prepare(content)
    assert isinstance(result, Prepared)
    assert result.entry.wire_ready is ready
    round_trip = QueueEntry.from_json(json.loads(json.dumps(result.entry.to_json())))
    assert round_trip.wire_ready is ready
    if ready:  # what the spool stores (trace header and content) needs no stuffing
        assert data_payload(result.data) == result.data + b".\r\n"
