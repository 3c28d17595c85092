"""Property-based fuzzing (hypothesis) of the command parser, the address parser and the DATA
path: the pure decoders the front uses, and the real relay process over a socket.

Profiles: ``mailrelay-short`` for the normal suite (a few hundred examples per target) and
``long`` (100,000 examples per target) for ``make fuzz-long`` (``HYPOTHESIS_PROFILE=long
pytest -m fuzz_long``); the long tests carry ``@pytest.mark.fuzz_long`` so ``make test`` leaves
them out. The profiles are applied per test (no global `load_profile`), so other suites that use
hypothesis keep their own settings. The number of inputs tried is written to the figures file.

Properties: nothing raises except the documented `CommandError`; a command line the checker
passes holds no CR, LF or control character; an address the parser returns holds none either,
and an untrusted client may only ever reach an accepted domain with no routing characters; the
DATA decoder finds the same end and content however the bytes are chunked, keeps only CRLF
line ends, and gives back exactly what a correct client dot-stuffed; the real relay answers
every fuzzed session with well-formed replies, never crashes and never logs a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core.addresses import has_routing_characters, relay_permission
from relay.core.smtp_data import DataDecoder
from relay.core.smtp_payload import data_payload
from relay.core.smtp_syntax import (
    CommandError,
    check_command_line,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
)
from tests.faults.harness import RawSession, record_figures
from tests.hostile.conftest import UNTRUSTED, Hostile

settings.register_profile(
    "mailrelay-short",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long",
    max_examples=100_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SHORT = settings.get_profile("mailrelay-short")
LONG = settings.get_profile("long")
SOCKET_SHORT = settings(SHORT, max_examples=60)
# A plain `pytest` (no -m) must not start a run of hours: the long tests need the profile too.
LONG_ONLY = pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE") != "long", reason="the long fuzzing run: make fuzz-long"
)

TRIED: Counter[str] = Counter()
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ACCEPT = ["example.com"]


def count(target: str) -> None:
    """One more input tried; the figures are written every 1,000 inputs and after each test,
    so an interrupted long run still leaves what it measured."""
    TRIED[target] += 1
    if TRIED[target] % 1000 == 0:
        save(target)


def save(target: str) -> None:
    profile = "long" if target.endswith("_long") else "short"
    record_figures(f"hostile.fuzz.{target.removesuffix('_long')}.{profile}", inputs=TRIED[target])


@pytest.fixture(autouse=True)
def figures() -> Iterator[None]:
    yield
    for target in TRIED:
        save(target)


def both(strategy: Any) -> Callable[[Callable[..., None]], tuple[Any, Any]]:
    """A short test (normal suite) and a long one (marked fuzz_long) from one property."""

    def make(check: Callable[..., None]) -> tuple[Any, Any]:
        name = check.__name__

        @SHORT
        @given(strategy)
        def short(value: Any) -> None:
            count(name)
            check(value)

        @pytest.mark.fuzz_long
        @LONG_ONLY
        @LONG
        @given(strategy)
        def long(value: Any) -> None:
            count(name + "_long")
            check(value)

        return short, long

    return make


# ----------------------------------------------------------------------------- command lines

SMTP_WORDS = st.sampled_from(
    [b"MAIL FROM:", b"RCPT TO:", b"EHLO ", b"HELO ", b"DATA", b"AUTH PLAIN ", b"<", b">", b"@", b"%", b"!"]
)
LINE_BYTES = st.lists(st.one_of(SMTP_WORDS, st.binary(max_size=40)), max_size=8).map(b"".join)


def command_line(raw: bytes) -> None:
    for line in (raw, raw + b"\r\n", raw + b"\n"):
        problem = check_command_line(line, 2050)
        if problem is None:
            body = line[:-2]
            assert line.endswith(b"\r\n")
            assert b"\r" not in body and b"\n" not in body
            assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", body)
        else:
            assert 500 <= problem.code < 600


test_command_line, test_command_line_long = both(LINE_BYTES)(command_line)


# ----------------------------------------------------------------------------- addresses

ADDRESS_TEXT = st.lists(
    st.one_of(
        st.sampled_from(
            ['"', "\\", "@", "%", "!", ":", ",", "[", "]", "<", ">", ".", "example.com", "IPv6:", " "]
        ),
        st.text(max_size=12),
    ),
    max_size=10,
).map("".join)


def address(text: str) -> None:
    for keyword, arg in (("FROM:", f"FROM:<{text}>"), ("TO:", f"TO:<{text}>"), ("TO:", f"TO:{text}")):
        for utf8 in (False, True):
            try:
                path = parse_path(arg, keyword, utf8=utf8, null_allowed=keyword == "FROM:")
                params = parse_mail_params(path.params, 1 << 20) if keyword == "FROM:" else None
                if keyword == "TO:":
                    parse_rcpt_params(path.params)
            except CommandError as exc:
                assert 500 <= exc.reply.code < 600
                continue
            assert params is None or params.body in (None, "7BIT", "8BITMIME")
            assert not CONTROL.search(path.address), path
            assert path.address == "" or "@" in path.address or path.address.lower() == "postmaster"
            decision = relay_permission(
                path.local, path.domain, trusted=False, authenticated=False, accept_domains=ACCEPT
            )
            if decision.allowed:  # the untrusted client reaches an accepted domain, and only plainly
                assert path.domain == "example.com"
                assert not has_routing_characters(path.local)


test_address, test_address_long = both(ADDRESS_TEXT)(address)


# ----------------------------------------------------------------------------- DATA

CONTENT = st.lists(
    st.one_of(
        st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b"\n.\n", b"\x00"]),
        st.binary(max_size=30),
    ),
    max_size=25,
).map(b"".join)
DATA_CASE = st.tuples(CONTENT, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=10))


def feed_in_chunks(data: bytes, sizes: list[int]) -> tuple[DataDecoder, int]:
    decoder = DataDecoder(1 << 20)
    offset, i = 0, 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        i += 1
        chunk = data[offset : offset + size]
        used = decoder.feed(chunk)
        if used >= 0:
            return decoder, offset + used
        offset += len(chunk)
    return decoder, -1


def normalise(content: bytes) -> bytes:
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def data_path(case: tuple[bytes, list[int]]) -> None:
    content, sizes = case
    # 1) arbitrary bytes (possibly with fake ends): chunking never changes the outcome
    whole, end = feed_in_chunks(content + b"\r\n.\r\n", [1 << 30])
    chunked, end_chunked = feed_in_chunks(content + b"\r\n.\r\n", sizes)
    assert end == end_chunked >= 0
    assert whole.problem == chunked.problem
    if whole.problem is None:
        decoded = whole.content()
        assert decoded == chunked.content()
        assert b"\r" not in decoded.replace(b"\r\n", b"") and b"\n" not in decoded.replace(b"\r\n", b"")
        # wire_ready (the next hop gets the content as it is, then the final dot) is never
        # claimed for content that needs stuffing, whatever the chunking
        for decoder in (whole, chunked):
            if decoder.wire_ready:
                assert data_payload(decoded) == decoded + b".\r\n"
    # 2) what a correct client sends (line ends normalised, dot-stuffed) comes back unchanged
    if b"\x00" not in content:
        lines = normalise(content)
        stuffed = b"".join(
            (b"." + line if line.startswith(b".") else line)
            for line in lines.split(b"\r\n")[:-1]
            for line in [line + b"\r\n"]
        )
        decoder, used = feed_in_chunks(stuffed + b".\r\n", sizes)
        assert used == len(stuffed) + 3
        if decoder.problem is None:
            assert decoder.content() == lines
        else:
            assert any(len(line) > 998 for line in lines.split(b"\r\n"))


test_data_path, test_data_path_long = both(DATA_CASE)(data_path)


# ----------------------------------------------------------------------------- the real relay

VERBS = st.sampled_from(
    [
        "EHLO fuzz.test",
        "HELO fuzz.test",
        "MAIL FROM:<a@sender.test>",
        "RCPT TO:<user@example.com>",
        "RCPT TO:<victim@victim.test>",
        "DATA",
        "RSET",
        "NOOP",
        "VRFY x",
        "STARTTLS",
        "AUTH PLAIN",
        "HELP",
    ]
)
SESSION = st.lists(st.one_of(VERBS.map(str.encode), LINE_BYTES), max_size=12)


def relay_session(hostile: Hostile, steps: list[bytes], body: bytes) -> None:
    """One session: each step is a command line; a 354 is followed by the body and the end."""
    body = b"X" + body.replace(b"\r\n.\r\n", b"\r\n..\r\n") + b"\r\n.\r\n"
    with RawSession.connect(hostile.port, source=UNTRUSTED) as s:
        assert s.reply()[0] == 220
        replies = []
        with contextlib.suppress(ConnectionError, OSError):
            for step in steps:
                s.send(step + b"\r\n")
                code, _ = s.reply()
                replies.append(code)
                if code == 354:
                    s.send(body)
                    replies.append(s.reply()[0])
            s.send(b"QUIT\r\n")
            replies.extend(code for code, _ in s.replies_until_closed())
    assert all(200 <= code < 600 for code in replies), replies


@SOCKET_SHORT
@given(steps=SESSION, body=CONTENT)
def test_relay_over_a_socket(hostile: Hostile, steps: list[bytes], body: bytes) -> None:
    count("relay_sessions")
    relay_session(hostile, steps, body)


@pytest.mark.fuzz_long
@LONG_ONLY
@LONG
@given(steps=SESSION, body=CONTENT)
def test_relay_over_a_socket_long(hostile: Hostile, steps: list[bytes], body: bytes) -> None:
    count("relay_sessions_long")
    relay_session(hostile, steps, body)


def test_relay_survived_the_fuzzing(hostile: Hostile) -> None:
    survived(hostile, "hostile.fuzz_relay_process")


@pytest.mark.fuzz_long
@LONG_ONLY
def test_relay_survived_the_socket_fuzzing_long(hostile: Hostile) -> None:
    survived(hostile, "hostile.fuzz_relay_process.long")


def survived(hostile: Hostile, case: str) -> None:
    record_figures(case, **hostile.health())
    assert hostile.relay.run.process is not None and hostile.relay.run.process.poll() is None
    hostile.relay.assert_no_traceback()
    hostile.relay.wait_queue_empty(60)
    assert hostile.victim.messages == []  # untrusted fuzzing never relayed anywhere
    for message in hostile.inbox.messages:
        stripped = message.content.replace(b"\r\n", b"")
        assert b"\r" not in stripped and b"\n" not in stripped
