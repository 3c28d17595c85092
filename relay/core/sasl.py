"""SMTP AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms, as a pure exchange.

`start(argument)` reads the AUTH command's argument (mechanism and optional initial response)
and gives the first step; while the step is a `Challenge`, the front sends ``334`` and its
base64 prompt and hands the client's answer line to `SaslExchange.answer`. The exchange ends in
`Credentials` (user and password, to be checked against the users file) or in a `Reply` that
refuses it: unknown mechanism ``504 5.5.4``, bad syntax ``501 5.5.4``, bad base64 ``501 5.5.2``,
a malformed PLAIN response ``501 5.5.2``, ``*`` (RFC 4954 4: the client cancels) ``501 5.7.0``.
An initial response of ``=`` is the empty response (RFC 4954 4). A PLAIN authorisation
identity is ignored (a user can only act as itself). The user name is decoded as UTF-8 with
replacement characters; the password keeps undecodable bytes (surrogateescape), so the users
file's hash sees exactly the bytes the client sent.

What it must not decide: whether the credentials are right (relay.users), whether AUTH is
allowed now (TLS, listener, transaction: the front), the brute-force delay and cut-off (the
front, per session). Pure: no I/O, never async.
"""

from __future__ import annotations

import binascii
from base64 import b64decode, b64encode
from dataclasses import dataclass

from relay.core import status
from relay.core.status import Reply

MECHANISMS = ("PLAIN", "LOGIN")  # the EHLO keyword is "AUTH PLAIN LOGIN"

SYNTAX = status.BAD_ARGUMENTS.with_text("Syntax: AUTH mechanism [initial-response]")
MALFORMED_PLAIN = status.AUTH_BAD_BASE64.with_text("Malformed PLAIN response (RFC 4616)")
# The answers to a 334 challenge keep the texts aiosmtpd's challenge_auth gave them.
CANCELLED = Reply(501, "5.7.0", "Auth aborted")
BAD_ANSWER_BASE64 = Reply(501, "5.5.2", "Can't decode base64")


@dataclass(frozen=True)
class Challenge:
    """Send ``334 <base64 of prompt>`` and pass the client's next line to `answer`."""

    prompt: str

    @property
    def line(self) -> str:
        return "334 " + b64encode(self.prompt.encode()).decode("ascii")


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


Step = Challenge | Credentials | Reply


def _credentials(user: bytes, password: bytes) -> Credentials:
    return Credentials(user.decode("utf-8", "replace"), password.decode("utf-8", "surrogateescape"))


def _plain(blob: bytes) -> Credentials | Reply:
    parts = blob.split(b"\x00")
    if len(parts) != 3:
        return MALFORMED_PLAIN
    _authzid, user, password = parts
    return _credentials(user, password)


def decode_initial_response(given: str) -> bytes | Reply:
    """The initial response on the AUTH line: ``=`` is empty, else strict base64."""
    if given == "=":
        return b""
    try:
        return b64decode(given.encode("ascii", "replace"), validate=True)
    except ValueError:
        return status.AUTH_BAD_BASE64


def decode_answer(line: bytes) -> bytes | Reply:
    """A client's answer to a challenge (the line as read, CRLF included): ``*`` cancels."""
    blob = line.strip()
    if blob == b"*":
        return CANCELLED
    try:
        return b64decode(blob, validate=True)
    except binascii.Error:
        return BAD_ANSWER_BASE64


class SaslExchange:
    """One AUTH exchange: `first` after `start`, then `answer` for each challenge."""

    def __init__(self, mechanism: str, initial: str | None) -> None:
        self.mechanism = mechanism
        self._initial = initial
        self._user: bytes | None = None

    def first(self) -> Step:
        if self._initial is None:
            return Challenge("" if self.mechanism == "PLAIN" else "Username:")
        decoded = decode_initial_response(self._initial)
        if isinstance(decoded, Reply):
            return decoded
        return self._take(decoded)

    def answer(self, line: bytes) -> Step:
        decoded = decode_answer(line)
        if isinstance(decoded, Reply):
            return decoded
        return self._take(decoded)

    def _take(self, response: bytes) -> Step:
        if self.mechanism == "PLAIN":
            return _plain(response)
        if self._user is None:  # LOGIN: the user name, then the password
            self._user = response
            return Challenge("Password:")
        return _credentials(self._user, response)


def start(argument: str | None) -> SaslExchange | Reply:
    """The exchange an ``AUTH`` argument asks for, or the reply refusing it."""
    words = (argument or "").split()
    if not words or len(words) > 2:
        return SYNTAX
    mechanism = words[0].upper()
    if mechanism not in MECHANISMS:
        return status.AUTH_MECHANISM
    return SaslExchange(mechanism, words[1] if len(words) > 1 else None)
