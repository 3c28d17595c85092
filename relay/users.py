"""SMTP AUTH credentials: the users file and password hashes.

The users file (a mounted Secret, ``auth.usersFile``) holds one ``user:{SCHEME}hash`` per line;
blank lines and lines starting with ``#`` are ignored. It may instead be a YAML mapping whose
entries can bind a user to the senders it may use (relay.core.senders, Postfix's
``reject_sender_login_mismatch``)::

    alice:
      password: "{PBKDF2-SHA256}310000$..."
      senders: [alice@example.com, "*@team.example.com"]
    bob: "{PBKDF2-SHA256}310000$..."      # no senders: any sender

(a file is YAML when it parses as a YAML mapping; a ``user:{SCHEME}hash`` line is a plain
YAML scalar, never a mapping). Schemes:

- ``{PBKDF2-SHA256}iterations$salt_b64$hash_b64`` (hashlib.pbkdf2_hmac, the default of
  ``mailrelay hash-password``);
- ``{PLAIN}secret`` for demos and tests only.

Checks compare in constant time (hmac.compare_digest) and an unknown user costs as much as a
known one, so timing reveals neither. Verification is CPU work (PBKDF2): the front
(relay.front_session) runs `UserDatabase.verify` in a thread. Decoding the AUTH exchange is
relay.core.sasl's; the brute-force limit (``auth.maxFailures``) and the delay after a failure
belong to the front (per session), not here.

This module reads one file and hashes; it never touches the network.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_ITERATIONS = 310_000  # OWASP 2023 guidance for PBKDF2-HMAC-SHA256
_DUMMY = "{PBKDF2-SHA256}310000$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


class UsersFileError(ValueError):
    """A users file line that cannot be used; the message names the line."""


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """A ``{PBKDF2-SHA256}`` hash for the users file."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "{PBKDF2-SHA256}%d$%s$%s" % (  # noqa: UP031 (the braces are literal)
        iterations,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(digest).decode("ascii"),
    )


def _check_hash(stored: str) -> None:
    if stored.startswith("{PLAIN}"):
        return
    if not stored.startswith("{PBKDF2-SHA256}"):
        raise UsersFileError("unknown hash scheme (use {PBKDF2-SHA256} or {PLAIN})")
    try:
        iterations, salt, digest = stored[len("{PBKDF2-SHA256}") :].split("$")
        if int(iterations) < 1:
            raise ValueError("iterations")
        base64.b64decode(salt, validate=True)
        base64.b64decode(digest, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise UsersFileError("malformed {PBKDF2-SHA256} hash (iterations$salt_b64$hash_b64)") from exc


def verify_password(stored: str, password: str) -> bool:
    """Whether `password` matches a stored hash; constant time in the password."""
    given = password.encode("utf-8", "surrogateescape")
    if stored.startswith("{PLAIN}"):
        return hmac.compare_digest(stored[len("{PLAIN}") :].encode("utf-8"), given)
    if stored.startswith("{PBKDF2-SHA256}"):
        try:
            iterations, salt, digest = stored[len("{PBKDF2-SHA256}") :].split("$")
            expected = base64.b64decode(digest, validate=True)
            computed = hashlib.pbkdf2_hmac(
                "sha256", given, base64.b64decode(salt, validate=True), int(iterations)
            )
        except (ValueError, binascii.Error):
            return False
        return hmac.compare_digest(expected, computed)
    return False


def parse_users(text: str) -> dict[str, str]:
    """``{user: stored hash}`` from the users file text; raises UsersFileError naming the line."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, stored = line.partition(":")
        if not colon or not user or not stored:
            raise UsersFileError(f"line {number}: expected user:{{SCHEME}}hash")
        try:
            _check_hash(stored)
        except UsersFileError as exc:
            raise UsersFileError(f"line {number} ({user}): {exc}") from exc
        users[user] = stored
    return users


def _yaml_users(data: dict[Any, Any]) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    users: dict[str, str] = {}
    senders: dict[str, tuple[str, ...]] = {}
    for user, entry in data.items():
        where = f"user {user!r}"
        stored: Any
        allowed: Any
        if isinstance(entry, str):
            stored, allowed = entry, None
        elif isinstance(entry, dict):
            unknown = sorted(set(map(str, entry)) - {"password", "senders"})
            if unknown:
                raise UsersFileError(f"{where}: unknown field {', '.join(unknown)} (password, senders)")
            stored, allowed = entry.get("password"), entry.get("senders")
        else:
            raise UsersFileError(f"{where}: expected a hash or a mapping with password and senders")
        if not isinstance(user, str) or not user or not isinstance(stored, str):
            raise UsersFileError(f"{where}: password must be a {{SCHEME}}hash string")
        try:
            _check_hash(stored)
        except UsersFileError as exc:
            raise UsersFileError(f"{where}: {exc}") from exc
        users[user] = stored
        if allowed is not None:
            if not isinstance(allowed, list) or not all(isinstance(a, str) and a for a in allowed):
                raise UsersFileError(f"{where}: senders must be a list of addresses or patterns")
            bad = [a for a in allowed if a != "*" and "@" not in a]
            if bad:
                raise UsersFileError(f"{where}: sender pattern {bad[0]!r} needs an @ (or is '*')")
            senders[user] = tuple(allowed)
    return users, senders


def parse_users_file(text: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """(``{user: stored hash}``, ``{user: allowed sender patterns}``) from either form of the
    users file; raises UsersFileError naming the line or the user."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict):
        return _yaml_users(data)
    return parse_users(text), {}


@dataclass
class UserDatabase:
    """The users file, re-read when its modification time or inode changes (Secret rotation)."""

    path: Path
    _users: dict[str, str]
    _stamp: tuple[int, int, float] | None
    _senders: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> UserDatabase:
        database = cls(Path(path), {}, None)
        database.refresh()
        return database

    def _current_stamp(self) -> tuple[int, int, float] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime)

    def refresh(self) -> None:
        """Re-read the file if it changed. A missing or broken file keeps the previous users
        (raising UsersFileError only on the first load)."""
        stamp = self._current_stamp()
        if stamp is not None and stamp == self._stamp:
            return
        try:
            users, senders = parse_users_file(self.path.read_text(encoding="utf-8"))
        except (OSError, UsersFileError, UnicodeDecodeError) as exc:
            if self._stamp is None and not self._users:
                raise UsersFileError(f"{self.path}: {exc}") from exc
            return
        self._users = users
        self._senders = senders
        self._stamp = stamp

    def __len__(self) -> int:
        return len(self._users)

    def senders(self, user: str) -> tuple[str, ...] | None:
        """The sender patterns a user's entry lists; None when it lists none (unrestricted)."""
        return self._senders.get(user)

    def verify(self, user: str, password: str) -> bool:
        """Blocking (PBKDF2): call from a thread. Unknown users cost the same as known ones."""
        stored = self._users.get(user)
        if stored is None:
            verify_password(_DUMMY, password)
            return False
        return verify_password(stored, password)
