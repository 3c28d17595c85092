"""relay.core.smtp_payload: the DATA payload (dot-stuffing, CRLF, final dot); its two paths agree
and relay.core.smtp_data's decoder undoes it."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.smtp_data import DataDecoder
from relay.core.smtp_payload import clean_payload, data_payload, normalised_payload


@pytest.mark.parametrize(
    ("content", "payload"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b".x\r\n.\r\n..y\r\nz.\r\n", b"..x\r\n..\r\n...y\r\nz.\r\n.\r\n"),
        (b"", None),
        (b"a\r\nb", None),  # no CRLF at the end
        (b"a\nb\r\n", None),  # bare LF
        (b"a\rb\r\n", None),  # bare CR
        (b"a\n\r\n", None),
    ],
)
def test_clean_payload_stuffs_dots_of_crlf_clean_content_only(content: bytes, payload: bytes | None) -> None:
    assert clean_payload(content) == payload


@pytest.mark.parametrize(
    ("content", "payload"),
    [
        (b"a\nb", b"a\r\nb\r\n.\r\n"),
        (b"a\rb\r\n.x\n", b"a\r\nb\r\n..x\r\n.\r\n"),
        (b".\n", b"..\r\n.\r\n"),
        (b"", b"\r\n.\r\n"),
    ],
)
def test_normalised_payload(content: bytes, payload: bytes) -> None:
    assert normalised_payload(content) == payload


_CONTENT = st.lists(
    st.sampled_from([b"a", b".", b"..", b"\r\n", b"\r", b"\n", b"x.y", b" "]), max_size=20
).map(b"".join)


@given(_CONTENT)
def test_both_paths_give_one_payload_that_the_decoder_undoes(content: bytes) -> None:
    payload = data_payload(content)
    assert payload == normalised_payload(content)
    clean = clean_payload(content)
    assert clean is None or clean == payload
    decoder = DataDecoder(max_size=1 << 20)
    assert decoder.feed(payload) == len(payload)
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    if not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert decoder.content() == expected
