"""Table tests for the front's pure decisions: relay permission (every open-relay trick),
command and path syntax, ESMTP parameters, the DATA decoder (smuggling, normalisation, limits),
trace headers and hop counting, replies, users-file hashes."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import parse_config
from relay.core import status
from relay.core.addresses import (
    client_is_trusted,
    has_routing_characters,
    postmaster_address,
    relay_permission,
)
from relay.core.received import (
    TraceInfo,
    build_received,
    count_received,
    protocol_name,
    submission_headers,
)
from relay.core.smtp_data import DataDecoder, has_line_longer_than
from relay.core.smtp_payload import data_payload
from relay.core.smtp_syntax import (
    CommandError,
    check_command_line,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
    xtext_decode,
)
from relay.core.status import with_enhanced_code
from relay.users import UsersFileError, hash_password, parse_users, verify_password

ACCEPT = ["example.com", "*.corp.example"]


def judge(rcpt: str, *, trusted: bool = False, authenticated: bool = False) -> str:
    """The reply (or "ok") an untrusted client gets for RCPT TO:<rcpt>."""
    try:
        path = parse_path(f"TO:<{rcpt}>", "TO:", utf8=False, null_allowed=False)
    except CommandError as exc:
        return f"{exc.reply.code} {exc.reply.status}"
    decision = relay_permission(
        path.local, path.domain, trusted=trusted, authenticated=authenticated, accept_domains=ACCEPT
    )
    return "ok" if decision.allowed else decision.reason


@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        ("user@example.com", "ok"),
        ("User@EXAMPLE.COM", "ok"),
        ("user@example.com.", "ok"),
        ("user@mail.corp.example", "ok"),
        ("user@corp.example", "relay_denied"),  # *.name means strict subdomains
        ("user@evil.com", "relay_denied"),
        ("user@example.com.evil.com", "relay_denied"),
        ("user@evilexample.com", "relay_denied"),
        # percent hack, bang path, quoted routing characters
        ("victim%evil.com@example.com", "routing_characters"),
        ("evil.com!victim@example.com", "routing_characters"),
        ('"victim@evil.com"@example.com', "routing_characters"),
        ('"victim%evil.com"@example.com', "routing_characters"),
        ('"evil.com!victim"@example.com', "routing_characters"),
        ('"vic\\@tim"@example.com', "routing_characters"),
        # source routes are stripped: the real destination decides
        ("@example.com:victim@evil.com", "relay_denied"),
        ("@example.com,@mx.example.com:victim@evil.com", "relay_denied"),
        ("@evil.com:user@example.com", "ok"),
        # several unquoted @ are not an address at all
        ("victim@evil.com@example.com", "553 5.1.3"),
        # IP literals and localhost are never accept domains
        ("user@[127.0.0.1]", "relay_denied"),
        ("user@[IPv6:::1]", "relay_denied"),
        ("user@[1.2.3.4]", "relay_denied"),
        ("user@localhost", "relay_denied"),
        ("user", "553 5.1.3"),
        ("@example.com", "553 5.1.3"),
        ("user@", "553 5.1.3"),
        ("user@exa mple.com", "553 5.1.3"),
        ("user@-example.com", "553 5.1.3"),
        ("user@[300.1.1.1]", "553 5.1.3"),
        ("user@[general:literal]", "553 5.1.3"),
        ("us\x00er@example.com", "553 5.1.3"),
        ("us\x7fer@example.com", "553 5.1.3"),
        ("us\x01er@example.com", "553 5.1.3"),
        ("üser@example.com", "553 5.6.7"),  # UTF-8 without SMTPUTF8
    ],
)
def test_relay_permission_for_untrusted_clients(rcpt: str, expected: str) -> None:
    assert judge(rcpt) == expected


@pytest.mark.parametrize("rcpt", ["user@evil.com", "victim%evil.com@example.com", "user@[1.2.3.4]"])
def test_trusted_and_authenticated_clients_may_relay_anywhere(rcpt: str) -> None:
    assert judge(rcpt, trusted=True) == "ok"
    assert judge(rcpt, authenticated=True) == "ok"


def test_star_accept_domain_never_makes_an_open_relay() -> None:
    decision = relay_permission("u", "evil.com", trusted=False, authenticated=False, accept_domains=["*"])
    assert not decision.allowed


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),
        ("11.0.0.1", False),
        ("fd00::1", True),
        ("fe80::1%eth0", False),
        ("garbage", False),
    ],
)
def test_trusted_networks(ip: str, expected: bool) -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
    assert client_is_trusted(ip, nets) is expected


def test_routing_characters_only_count_in_the_local_part() -> None:
    assert not has_routing_characters("plain.user+tag")
    assert has_routing_characters('"a!b"')


# ----------------------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b"MAIL FROM:<a@b.c>\r\n", None),
        (b"MAIL FROM:<a@b.c>\n", status.BARE_NEWLINE),
        (b"MAIL FROM:<a@b.c>\rRCPT TO:<x@y.z>\r\n", status.BARE_NEWLINE),
        (b"MAIL FROM:<a@b.c>\nRCPT TO:<x@y.z>\r\n", status.BARE_NEWLINE),
        (b"MAIL FROM:<a\x00@b.c>\r\n", status.CONTROL_CHARACTERS),
        (b"NOOP \x1b[31m\r\n", status.CONTROL_CHARACTERS),
        (b"NOOP \x7f\r\n", status.CONTROL_CHARACTERS),
        (b"NOOP\tx\r\n", None),
        (b"NOOP " + b"x" * 600 + b"\r\n", status.LINE_TOO_LONG),
    ],
)
def test_command_lines(raw: bytes, reply: status.Reply | None) -> None:
    assert check_command_line(raw, 512) == reply


def test_bare_postmaster() -> None:
    path = parse_path("TO:<PostMaster>", "TO:", utf8=False, null_allowed=False)
    assert (path.address, path.domain) == ("PostMaster", "")
    with pytest.raises(CommandError):  # only RCPT has the unqualified postmaster
        parse_path("FROM:<postmaster>", "FROM:", utf8=False, null_allowed=True)
    assert postmaster_address("relay.test", ["*.corp.example", "Example.COM"]) == "postmaster@example.com"
    assert postmaster_address("Relay.Test.", ["*"]) == "postmaster@relay.test"


def test_paths() -> None:
    path = parse_path("FROM:<>", "FROM:", utf8=False, null_allowed=True)
    assert path.address == ""
    path = parse_path("FROM: <Joe@Example.ORG> SIZE=10 BODY=8bitmime", "FROM:", utf8=False, null_allowed=True)
    assert (path.address, path.params) == ("Joe@example.org", (("SIZE", "10"), ("BODY", "8bitmime")))
    path = parse_path('TO:<"a b>c"@x.org>', "TO:", utf8=False, null_allowed=False)
    assert path.local == '"a b>c"'
    path = parse_path("TO:<@[IPv6:::1],@a.org:u@b.org>", "TO:", utf8=False, null_allowed=False)
    assert (path.address, path.source_route) == ("u@b.org", ("[ipv6:::1]", "a.org"))
    path = parse_path("TO:<ü@bücher.example>", "TO:", utf8=True, null_allowed=False)
    assert path.domain == "bücher.example"
    path = parse_path("FROM:a@b.org", "FROM:", utf8=False, null_allowed=True)  # lenient: no brackets
    assert path.address == "a@b.org"
    for bad in ("TO:<>", "TO:<a@b.org", "TO:<a@b.org>junk", "FROM<a@b.org>", "TO:<a@b.org> NOTIFY="):
        with pytest.raises(CommandError):
            parse_path(bad, bad[:3] if bad.startswith("TO") else "FROM:", utf8=False, null_allowed=False)
    with pytest.raises(CommandError) as info:
        parse_path("TO:<a@b.org\udcff>", "TO:", utf8=True, null_allowed=False)
    assert info.value.reply is status.BAD_RECIPIENT


def test_mail_and_rcpt_parameters() -> None:
    params = parse_mail_params(
        [("SIZE", "100"), ("BODY", "8bitmime"), ("SMTPUTF8", None), ("RET", "hdrs"), ("ENVID", "a+2Bb")],
        1000,
    )
    assert (params.size, params.body, params.smtputf8, params.ret, params.envid) == (
        100,
        "8BITMIME",
        True,
        "HDRS",
        "a+2Bb",
    )
    assert xtext_decode("a+2Bb") == "a+b"
    for bad, reply in [
        ([("SIZE", "1001")], status.SIZE_EXCEEDED),
        ([("SIZE", "x")], status.BAD_PARAMETER),
        ([("BODY", "BINARYMIME")], None),
        ([("FOO", "1")], status.UNKNOWN_PARAMETER),
        ([("SIZE", "1"), ("SIZE", "1")], status.BAD_PARAMETER),
        ([("ENVID", "a=b")], None),
    ]:
        with pytest.raises(CommandError) as info:
            parse_mail_params(bad, 1000)
        if reply is not None:
            assert info.value.reply is reply
    rcpt = parse_rcpt_params([("NOTIFY", "failure,delay"), ("ORCPT", "RFC822;a+40b")])
    assert (rcpt.notify, rcpt.orcpt) == (("FAILURE", "DELAY"), "rfc822;a+40b")
    assert parse_rcpt_params([("NOTIFY", "NEVER")]).notify == ("NEVER",)
    for bad_params in (
        [("NOTIFY", "NEVER,FAILURE")],
        [("NOTIFY", "SOMETIMES")],
        [("ORCPT", "rfc822")],
        [("X", "1")],
    ):
        with pytest.raises(CommandError):
            parse_rcpt_params(bad_params)


# ----------------------------------------------------------------------------- DATA


def decode(stream: bytes, max_size: int = 10_000, chunk: int = 0) -> tuple[DataDecoder, bytes]:
    decoder = DataDecoder(max_size)
    chunks = [stream] if not chunk else [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    consumed = 0
    for piece in chunks:
        used = decoder.feed(piece)
        if used >= 0:
            consumed += used
            return decoder, stream[consumed:]
        consumed += len(piece)
    return decoder, b""


@pytest.mark.parametrize(
    ("stream", "content", "rest"),
    [
        (b".\r\n", b"", b""),
        (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
        (b"..a\r\n.b\r\n..\r\n.\r\n", b".a\r\nb\r\n.\r\n", b""),
        # smuggling variants: none of these ends the message; all become plain content
        (b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n", b"a\r\n.\r\nMAIL FROM:<x@y>\r\n", b""),
        (b"a\r.\rb\r\n.\r\n", b"a\r\n.\r\nb\r\n", b""),
        (b"a\n.\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n", b""),
        (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n", b""),  # ".\n" line: the dot is unstuffed
        (b"a\r\n.\rb\r\n.\r\n", b"a\r\n\r\nb\r\n", b""),
        (b"bare\nlf\r\n.\r\n", b"bare\r\nlf\r\n", b""),
    ],
)
def test_data_end_and_normalisation(stream: bytes, content: bytes, rest: bytes) -> None:
    for chunk in (0, 1, 2, 3, 7):
        decoder, left = decode(stream, chunk=chunk)
        assert decoder.done and decoder.problem is None, chunk
        assert decoder.content() == content, chunk
        assert left == rest, chunk
        assert b"\r\n.\r\n" not in b"\r\n" + decoder.content() or content.count(b"\r\n.\r\n") <= 1


@pytest.mark.parametrize(
    ("stream", "ready"),
    [
        (b".\r\n", False),  # empty: sent as an empty line, as data_payload does
        (b"a\r\nb\r\n.\r\n", True),
        (b"a\r\n..b\r\n.\r\n", False),  # unstuffed: the next hop needs it stuffed again
        (b"..a\r\n.\r\n", False),  # the first line
        (b"a\r\n.b\r\n.\r\n", False),  # not stuffed by the client, unstuffed all the same
        (b"a\n.b\r\n.\r\n", False),  # normalised: ".b" now starts a line
        (b"a\rb\r\n.\r\n", False),
        (b"x" * 999 + b"\r\n.\r\n", False),  # refused
    ],
)
def test_data_wire_ready(stream: bytes, ready: bool) -> None:
    """Whether the decoded content may go to the next hop unchanged (then ``.<CRLF>``): the
    front records it in the queue entry so delivery does not scan the message again."""
    for chunk in (0, 1, 2, 3, 5, 7):
        decoder, _ = decode(stream, chunk=chunk)
        assert decoder.wire_ready is ready, chunk
        if ready:
            assert data_payload(decoder.content()) == decoder.content() + b".\r\n"


def test_data_refusals() -> None:
    decoder, _ = decode(b"a\x00b\r\n.\r\n")
    assert decoder.problem is status.DATA_NUL
    decoder, _ = decode(b"x" * 999 + b"\r\n.\r\n")
    assert decoder.problem is status.DATA_LINE_TOO_LONG
    decoder, _ = decode(b"." + b"x" * 998 + b"\r\n.\r\n")  # stuffed 998: fine
    assert decoder.problem is None
    decoder, rest = decode(b"y" * 20_000 + b"\r\n.\r\nQUIT\r\n", chunk=1000)
    assert decoder.problem is status.SIZE_EXCEEDED and rest == b"QUIT\r\n"
    decoder, rest = decode((b"z" * 90 + b"\r\n") * 200 + b".\r\nNOOP\r\n", chunk=333)
    assert decoder.problem is status.SIZE_EXCEEDED and rest == b"NOOP\r\n"


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"")), max_size=20),
    cut=st.integers(min_value=1, max_value=50),
)
def test_data_any_chunking_gives_the_same_message(lines: list[bytes], cut: int) -> None:
    """Whatever the client sends and however TCP splits it: one message, no CR or LF that is
    not part of a CRLF, and the same result as reading it in one piece."""
    body = b"\r\n".join(line.replace(b"\r\n.\r\n", b"") for line in lines)
    stream = body + b"\r\n.\r\nNEXT\r\n"
    whole, rest_whole = decode(stream, max_size=1 << 20)
    split, rest_split = decode(stream, max_size=1 << 20, chunk=cut)
    assert whole.done and split.done
    assert whole.problem == split.problem
    if whole.problem is None:
        content = whole.content()
        assert content == split.content()
        assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")
    assert rest_whole == rest_split


# ----------------------------------------------------------------------------- trace headers


def test_received_header_and_hops() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    info = TraceInfo(
        helo="client.example",
        client_ip="192.0.2.1",
        hostname="relay.test",
        protocol=protocol_name(esmtp=True, tls=True, authenticated=True, smtputf8=False),
        queue_id="ABC123",
        recipients=("u@example.com",),
        when=when,
        tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
    )
    header = build_received(info)
    assert header == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        b"\tby relay.test (mailrelay) with ESMTPSA id ABC123\r\n"
        b"\tfor <u@example.com>; Wed, 01 May 2024 12:00:00 +0000\r\n"
    )
    many = build_received(TraceInfo("h", "2001:db8::1", "r", "ESMTP", "Q", ("a@x", "b@x"), when))
    assert b"from h ([IPv6:2001:db8::1])" in many and b"for <" not in many
    message = (
        header + b"received: x\r\nX-Received: no\r\n Received: continuation\r\n\r\nReceived: in body\r\n"
    )
    assert count_received(message) == 2
    assert count_received(b"Subject: x\r\n\r\n") == 0
    assert protocol_name(esmtp=False, tls=False, authenticated=False, smtputf8=False) == "SMTP"
    assert protocol_name(esmtp=True, tls=False, authenticated=False, smtputf8=True) == "UTF8SMTP"
    assert protocol_name(esmtp=True, tls=True, authenticated=False, smtputf8=False) == "ESMTPS"


def test_hop_limit_defaults_to_100() -> None:
    """RFC 5321 6.3: the hop limit is configurable and at least 100 by default."""
    minimal = {"hostname": "r.test", "listeners": [{"name": "smtp", "port": 25}]}
    assert parse_config(minimal).limits.max_hops == 100
    assert parse_config({**minimal, "limits": {"maxHops": 30}}).limits.max_hops == 30


def test_submission_headers_only_when_missing() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    added = submission_headers(
        b"Subject: x\r\n\r\nbody\r\n", when=when, queue_id="Q1", hostname="h", token="t"
    )
    assert added == b"Date: Wed, 01 May 2024 12:00:00 +0000\r\nMessage-ID: <Q1.t@h>\r\n"
    full = b"Date: x\r\nMessage-Id: <a@b>\r\n\r\nbody\r\n"
    assert submission_headers(full, when=when, queue_id="Q1", hostname="h", token="t") == b""


def test_enhanced_codes_are_added_where_missing() -> None:
    assert with_enhanced_code("250 OK") == "250 2.0.0 OK"
    assert with_enhanced_code("550 5.7.1 no") == "550 5.7.1 no"
    assert with_enhanced_code("354 go") == "354 go"
    assert str(status.RELAY_DENIED) == "554 5.7.1 Relay access denied"


# ----------------------------------------------------------------------------- users file


def test_password_hashes() -> None:
    stored = hash_password("s3cret", iterations=1000)
    assert stored.startswith("{PBKDF2-SHA256}1000$")
    assert verify_password(stored, "s3cret")
    assert not verify_password(stored, "s3cret ")
    assert verify_password("{PLAIN}demo", "demo")
    assert not verify_password("{PLAIN}demo", "Demo")
    assert not verify_password("{MD5}x", "x")
    users = parse_users(f"# comment\n\nalice:{stored}\nbob:{{PLAIN}}pw\n")
    assert set(users) == {"alice", "bob"}
    for bad in ("alice", "alice:{MD5}abc", "alice:{PBKDF2-SHA256}x$y"):
        with pytest.raises(UsersFileError, match="line 1"):
            parse_users(bad)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=1100), min_size=1, max_size=40),
    st.sampled_from([5, 998, 1000]),
)
def test_long_line_check_agrees_with_splitting_the_region(lengths: list[int], limit: int) -> None:
    region = b"".join(b"y" * n + b"\r\n" for n in lengths)
    assert has_line_longer_than(region, limit) == (max(lengths) > limit)
