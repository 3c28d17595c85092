"""Table tests for relay.core.sasl: the AUTH argument, the PLAIN and LOGIN exchanges, the
client's answers to a 334 (``*``, bad base64) and how credentials are decoded."""

from __future__ import annotations

from base64 import b64encode

import pytest

from relay.core import sasl, status
from relay.core.sasl import Challenge, Credentials, SaslExchange
from relay.core.status import Reply


def b64(data: bytes) -> str:
    return b64encode(data).decode("ascii")


def run(argument: str | None, answers: list[bytes]) -> tuple[list[str], sasl.Step]:
    """The 334 lines sent and the exchange's final step, answering each challenge in turn."""
    exchange = sasl.start(argument)
    if isinstance(exchange, Reply):
        return [], exchange
    prompts: list[str] = []
    step = exchange.first()
    given = iter(answers)
    while isinstance(step, Challenge):
        prompts.append(step.line)
        step = exchange.answer(next(given) + b"\r\n")
    return prompts, step


ALICE = Credentials("alice", "wonderland")
NUL = b"\x00"
ALICE_PLAIN = b64(NUL + b"alice" + NUL + b"wonderland")
USERNAME, PASSWORD = "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"  # "Username:", "Password:"


@pytest.mark.parametrize(
    ("argument", "answers", "prompts", "final"),
    [
        # the AUTH argument
        (None, [], [], sasl.SYNTAX),
        ("", [], [], sasl.SYNTAX),
        ("PLAIN a b", [], [], sasl.SYNTAX),
        ("CRAM-MD5", [], [], status.AUTH_MECHANISM),
        ("XOAUTH2 abc", [], [], status.AUTH_MECHANISM),
        # PLAIN with an initial response (RFC 4616: authzid NUL authcid NUL passwd)
        (f"PLAIN {ALICE_PLAIN}", [], [], ALICE),
        (f"plain {ALICE_PLAIN}", [], [], ALICE),  # the mechanism is case-insensitive
        ("PLAIN " + b64(b"bob" + NUL + b"alice" + NUL + b"wonderland"), [], [], ALICE),  # authzid ignored
        ("PLAIN " + b64(b"alice" + NUL + b"wonderland"), [], [], sasl.MALFORMED_PLAIN),
        ("PLAIN " + b64(NUL + b"alice" + NUL + b"wonder" + NUL + b"land"), [], [], sasl.MALFORMED_PLAIN),
        ("PLAIN =", [], [], sasl.MALFORMED_PLAIN),  # "=" is the empty response
        ("PLAIN not*base64", [], [], status.AUTH_BAD_BASE64),
        ("PLAIN AGFsaWNl", [], [], sasl.MALFORMED_PLAIN),  # "\0alice": one NUL
        # PLAIN without: an empty challenge ("334 " with its mandatory space)
        ("PLAIN", [ALICE_PLAIN.encode()], ["334 "], ALICE),
        ("PLAIN", [b"*"], ["334 "], sasl.CANCELLED),
        ("PLAIN", [b"%%%"], ["334 "], sasl.BAD_ANSWER_BASE64),
        ("PLAIN", [b""], ["334 "], sasl.MALFORMED_PLAIN),
        # LOGIN: user name, then password
        ("LOGIN", [b64(b"alice").encode(), b64(b"wonderland").encode()], [USERNAME, PASSWORD], ALICE),
        ("LOGIN " + b64(b"alice"), [b64(b"wonderland").encode()], [PASSWORD], ALICE),
        ("LOGIN", [b"*"], [USERNAME], sasl.CANCELLED),
        ("LOGIN", [b64(b"alice").encode(), b"*"], [USERNAME, PASSWORD], sasl.CANCELLED),
        ("LOGIN", [b64(b"alice").encode(), b"!"], [USERNAME, PASSWORD], sasl.BAD_ANSWER_BASE64),
        ("LOGIN =", [b"="], [PASSWORD], sasl.BAD_ANSWER_BASE64),  # "=" only on the AUTH line
        ("LOGIN !", [], [], status.AUTH_BAD_BASE64),
    ],
)
def test_exchanges(argument: str | None, answers: list[bytes], prompts: list[str], final: sasl.Step) -> None:
    assert run(argument, answers) == (prompts, final)


def test_replies_on_the_wire() -> None:
    assert str(sasl.SYNTAX) == "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
    assert str(sasl.MALFORMED_PLAIN) == "501 5.5.2 Malformed PLAIN response (RFC 4616)"
    assert str(sasl.CANCELLED) == "501 5.7.0 Auth aborted"
    assert str(sasl.BAD_ANSWER_BASE64) == "501 5.5.2 Can't decode base64"
    assert " ".join(sasl.MECHANISMS) == "PLAIN LOGIN"


@pytest.mark.parametrize(
    ("user", "password", "expected"),
    [
        (b"alice", b"wonderland", Credentials("alice", "wonderland")),
        ("jürgen".encode(), "pässwort".encode(), Credentials("jürgen", "pässwort")),
        (b"bad\xffname", b"x", Credentials("bad\ufffdname", "x")),  # user: replacement character
        (b"alice", b"raw\xff\xfe", Credentials("alice", "raw\udcff\udcfe")),  # password: bytes kept
    ],
)
def test_credentials_are_decoded(user: bytes, password: bytes, expected: Credentials) -> None:
    prompts, final = run("PLAIN " + b64(NUL + user + NUL + password), [])
    assert (prompts, final) == ([], expected)
    assert isinstance(final, Credentials)
    assert final.password.encode("utf-8", "surrogateescape") == password


def test_an_answer_line_is_stripped_of_its_line_end() -> None:
    exchange = SaslExchange("LOGIN", None)
    assert exchange.first() == Challenge("Username:")
    assert exchange.answer(b"  YWxpY2U=  \r\n") == Challenge("Password:")
    assert exchange.answer(b"d29uZGVybGFuZA==\n") == ALICE
