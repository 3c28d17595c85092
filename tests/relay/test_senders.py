"""Senders bound to logins, the pure rules: relay.core.addresses.address_matches (the one
mailbox-pattern matcher), relay.core.senders (envelope and From: checks) and the users file's
YAML form (relay.users.parse_users_file). Tables."""

from __future__ import annotations

import pytest

from relay.core.addresses import address_matches
from relay.core.senders import foreign_from, from_addresses, sender_allowed
from relay.users import UsersFileError, parse_users_file


@pytest.mark.parametrize(
    ("address", "pattern", "matches"),
    [
        ("alice@example.com", "alice@example.com", True),
        ("Alice@Example.COM", "alice@example.com", True),
        ("alice@example.com", "bob@example.com", False),
        ("bob@team.example.com", "*@team.example.com", True),
        ("bob@example.com", "*@team.example.com", False),
        ("bob@a.team.example.com", "*@team.example.com", False),
        ("bob@a.team.example.com", "*@*.team.example.com", True),
        ("bob@team.example.com", "*@*.team.example.com", False),
        ("alice@sub.example.com", "alice@*.example.com", True),
        ("anyone@anywhere.test", "*", True),
        ("anyone@anywhere.test", "*@*", True),
        ("", "*", False),
        ("", "*@example.com", False),
        ("alice", "alice@example.com", False),
        ('"alice"@example.com', "alice@example.com", True),
        ("alice@example.com.evil.test", "alice@example.com", False),
        ("alice@evil-example.com", "*@example.com", False),
        ("alice@example.com", "example.com", False),
    ],
)
def test_address_matches(address: str, pattern: str, matches: bool) -> None:
    assert address_matches(address, pattern) is matches


def test_sender_allowed() -> None:
    assert sender_allowed("x@y.test", None)  # no list: unrestricted
    assert not sender_allowed("x@y.test", ())
    assert sender_allowed("alice@example.com", ("alice@example.com", "*@team.example.com"))
    assert not sender_allowed("", ("alice@example.com",))  # no bounces from a user


@pytest.mark.parametrize(
    ("headers", "addresses"),
    [
        (b"From: Alice <alice@example.com>\r\nTo: b@c\r\n\r\nFrom: body@x.test\r\n", ["alice@example.com"]),
        (b'from: a@x.test, "B, Bee" <b@y.test>\r\n\r\n', ["a@x.test", "b@y.test"]),
        (b"From: Alice\r\n <alice@example.com>\r\n\r\n", ["alice@example.com"]),
        (b"Subject: x\r\nFrom: a@x.test\r\nFrom: c@z.test\r\n\r\n", ["a@x.test", "c@z.test"]),
        (b"Subject: no from\r\n\r\n", []),
        (b"X-From: spoof@x.test\r\nReply-To: r@x.test\r\n\r\n", []),
    ],
)
def test_from_addresses(headers: bytes, addresses: list[str]) -> None:
    assert from_addresses(headers) == addresses


def test_foreign_from() -> None:
    allowed = ("alice@example.com",)
    assert foreign_from(b"From: alice@example.com\r\n\r\n", allowed) is None
    assert foreign_from(b"From: Boss <ceo@example.com>\r\n\r\n", allowed) == "ceo@example.com"
    assert foreign_from(b"From: alice@example.com, ceo@example.com\r\n\r\n", allowed) == "ceo@example.com"
    assert foreign_from(b"From: ceo@example.com\r\n\r\n", None) is None


def test_users_file_yaml_form() -> None:
    text = """
alice:
  password: "{PLAIN}pw"
  senders: [alice@example.com, "*@team.example.com"]
bob: "{PLAIN}pw2"
"""
    users, senders = parse_users_file(text)
    assert users == {"alice": "{PLAIN}pw", "bob": "{PLAIN}pw2"}
    assert senders == {"alice": ("alice@example.com", "*@team.example.com")}
    # The line form is still the line form (a user:hash line is a YAML scalar, not a mapping).
    lines = parse_users_file("alice:{PLAIN}pw\nbob:{PLAIN}x\n")
    assert lines == ({"alice": "{PLAIN}pw", "bob": "{PLAIN}x"}, {})
    for bad, message in [
        ("alice: {password: '{MD5}x'}", "unknown hash scheme"),
        ("alice: {password: '{PLAIN}x', senders: example.com}", "senders must be a list"),
        ("alice: {password: '{PLAIN}x', senders: [example.com]}", "needs an @"),
        ("alice: {password: '{PLAIN}x', sender: [a@b.test]}", "unknown field sender"),
        ("alice: [1, 2]", "expected a hash or a mapping"),
    ]:
        with pytest.raises(UsersFileError, match=message):
            parse_users_file(bad)
