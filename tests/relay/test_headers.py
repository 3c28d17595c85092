"""relay.core.headers: the one place that finds the end of a message's header section."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.headers import header_end, header_names, header_section


@pytest.mark.parametrize(
    ("content", "section"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\r\n\r\nbody\r\n\r\nmore\r\n", b"A: 1\r\n"),  # the first empty line ends it
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),  # no body: all header
        (b"A: 1", b"A: 1"),
        (b"", b""),
        (b"\r\nbody\r\n\r\nX: not a header\r\n", b""),  # starts with the empty line: no header
        (b"\nbody\n", b""),
        (b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2\n"),  # bare LF lines
        (b"A: 1\n\r\nbody", b"A: 1\n"),  # an LF line, then an empty CRLF line
        (b"A: 1\r\n\nbody", b"A: 1\r\n"),  # a CRLF line, then an empty LF line
        (b"A: 1\n\nbody\r\n\r\nmore", b"A: 1\n"),  # the earlier empty line wins
        (b"A: 1\r\n folded\r\n\r\nbody", b"A: 1\r\n folded\r\n"),
    ],
)
def test_header_section(content: bytes, section: bytes) -> None:
    assert header_section(content) == section
    end = header_end(content)
    assert content[:end] == section
    rest = content[end:]
    assert rest == b"" or rest.startswith((b"\r\n", b"\n"))  # the body begins with the empty line


_LINES = st.lists(
    st.one_of(
        st.just(b""),
        st.sampled_from([b"Subject: x", b"Received: y", b" folded", b"\tfolded", b"X:", b"no colon"]),
        st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=8,
)


@given(_LINES)
def test_crlf_content_splits_where_the_first_crlf_crlf_is(lines: list[bytes]) -> None:
    """For CRLF-clean content (all the front stores) the definition every module had before:
    up to and including the CRLF before the first CRLF CRLF."""
    content = b"".join(line + b"\r\n" for line in lines)
    if content.startswith(b"\r\n"):
        expected = b""
    else:
        end = content.find(b"\r\n\r\n")
        expected = content if end < 0 else content[: end + 2]
    assert header_section(content) == expected


def test_header_names() -> None:
    section = b"Received: a\r\n\tfolded: no\r\nSUBJECT : x\r\nno colon\r\nX-B:\r\n"
    assert header_names(section) == ["received", "subject", "x-b"]
    assert header_names(b"Received: a\nTo: b\n") == ["received", "to"]
