"""SMTP command syntax: command lines, MAIL/RCPT paths and their ESMTP parameters.

The front (relay.front) hands every raw command line and every MAIL/RCPT argument to these
functions before acting on it; a problem becomes a `CommandError` carrying the reply to send.
Grammar from RFC 5321 4.1.2 (paths, local parts, domains, address literals) with RFC 6531
(SMTPUTF8: UTF-8 in local parts and domains), RFC 1870 (SIZE), RFC 6152 (BODY=8BITMIME),
RFC 3461 (NOTIFY, ORCPT, RET, ENVID; xtext) and RFC 4954 (AUTH= on MAIL, accepted and ignored).

Deliberate strictness (what aiosmtpd lets through and this module refuses): control characters
(NUL, DEL, C0) anywhere in a command; bare CR or LF inside a command line (only CRLF ends one);
``RCPT TO:<>``; several unquoted ``@``; general address literals. Deliberate leniency: a space
after ``FROM:``/``TO:`` and a path without angle brackets (common client bugs, harmless).
Source routes (``<@a,@b:u@c>``) are parsed and dropped, as RFC 5321 4.1.1.3 asks.

Pure functions: no I/O, never async.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from relay.core import status
from relay.core.status import Reply


class CommandError(ValueError):
    """A command that must be refused with `reply`."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or reply.text)
        self.reply = reply


# ----------------------------------------------------------------------------- command lines

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def check_command_line(raw: bytes, max_length: int) -> Reply | None:
    """Problems with one raw command line as read from the socket (terminator included).

    Only CRLF ends a command line (RFC 5321 2.3.8): a line ending in a bare LF, or holding a CR
    or LF anywhere else, is refused (the SMTP-smuggling family of ambiguities). TAB is allowed
    (it is whitespace in some clients' parameter lists); every other control character is not.
    """
    if len(raw) > max_length:
        return status.LINE_TOO_LONG
    if not raw.endswith(b"\r\n"):
        return status.BARE_NEWLINE
    body = raw[:-2]
    if b"\r" in body or b"\n" in body:
        return status.BARE_NEWLINE
    if _CONTROL.search(body):
        return status.CONTROL_CHARACTERS
    return None


# ----------------------------------------------------------------------------- paths

_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LDH = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class ParsedPath:
    """A MAIL or RCPT path. `address` is ``local@domain`` without any source route ("" for <>;
    the bare ``postmaster`` of RFC 5321 4.5.1 with domain "" for ``RCPT TO:<postmaster>``)."""

    address: str
    local: str  # as written (a quoted local part keeps its quotes)
    domain: str  # lower-cased; an address literal keeps its brackets
    source_route: tuple[str, ...]
    params: tuple[tuple[str, str | None], ...]  # upper-cased keywords, values as written


def _is_utf8_text(char: str) -> bool:
    # Non-ASCII that came from valid UTF-8 (surrogateescape leaves invalid bytes as surrogates).
    return ord(char) > 127 and not (0xD800 <= ord(char) <= 0xDFFF)


def _check_chars(text: str, utf8: bool, error: Reply) -> None:
    for char in text:
        code = ord(char)
        if code < 32 or code == 127:
            raise CommandError(error, "control character in address")
        if code > 127:
            if 0xD800 <= code <= 0xDFFF:
                raise CommandError(error, "invalid UTF-8 in address")
            if not utf8:
                raise CommandError(status.NO_SMTPUTF8)


def _valid_local(local: str, utf8: bool) -> bool:
    if not local:
        return False
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            return False
        inner = local[1:-1]
        escaped = False
        for char in inner:
            if escaped:
                if not (32 <= ord(char) <= 126):
                    return False
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"' or not (32 <= ord(char) <= 126 or (utf8 and _is_utf8_text(char))):
                return False
        return not escaped
    atoms = local.split(".")
    return all(atoms) and all(all(c in _ATEXT or (utf8 and _is_utf8_text(c)) for c in atom) for atom in atoms)


def valid_domain(domain: str, utf8: bool = False) -> bool:
    """A domain name (RFC 5321 4.1.2 Domain; U-labels only with SMTPUTF8) or address literal."""
    if domain.startswith("["):
        if not domain.endswith("]"):
            return False
        literal = domain[1:-1]
        if literal[:5].lower() == "ipv6:":
            try:
                ipaddress.IPv6Address(literal[5:])
            except ValueError:
                return False
            return True
        try:
            ipaddress.IPv4Address(literal)
        except ValueError:
            return False
        return True
    if domain.endswith("."):
        domain = domain[:-1]  # an absolute name
    if not domain or len(domain) > 253:
        return False
    for label in domain.split("."):
        if utf8 and not label.isascii():
            try:
                label = label.encode("idna").decode("ascii")
            except UnicodeError:
                return False
        if len(label) > 63 or not _LDH.match(label):
            return False
    return True


def _find_closing_bracket(text: str) -> int:
    """Index of the ``>`` closing a path that starts with ``<`` (quotes respected), or -1."""
    in_quotes = False
    escaped = False
    for index, char in enumerate(text):
        if index == 0:
            continue
        if escaped:
            escaped = False
        elif in_quotes and char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return index
    return -1


def _split_mailbox(mailbox: str, error: Reply) -> tuple[str, str]:
    """(local, domain) of ``local@domain``: the @ after the local part (quoted or dot-string)."""
    if mailbox.startswith('"'):
        escaped = False
        for index in range(1, len(mailbox)):
            char = mailbox[index]
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                rest = mailbox[index + 1 :]
                if not rest.startswith("@"):
                    raise CommandError(error, "missing @ after quoted local part")
                return mailbox[: index + 1], rest[1:]
        raise CommandError(error, "unterminated quoted local part")
    local, at, domain = mailbox.partition("@")
    if not at:
        raise CommandError(error, "missing domain")
    if "@" in domain:
        raise CommandError(error, "more than one @ in address")
    return local, domain


def _parse_params(text: str) -> tuple[tuple[str, str | None], ...]:
    params: list[tuple[str, str | None]] = []
    for word in text.split():
        keyword, eq, value = word.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", keyword) or (eq and not value):
            raise CommandError(status.BAD_ARGUMENTS, f"bad parameter {word!r}")
        if eq and any(ord(c) < 33 or ord(c) == 127 or c == "=" for c in value):
            raise CommandError(status.BAD_PARAMETER, f"bad parameter value in {word!r}")
        params.append((keyword.upper(), value if eq else None))
    return tuple(params)


def parse_path(arg: str | None, keyword: str, *, utf8: bool, null_allowed: bool) -> ParsedPath:
    """Parse ``FROM:<path> params`` (keyword ``FROM:``) or ``TO:<path> params`` (``TO:``).

    `utf8` allows UTF-8 in the address (the transaction uses SMTPUTF8). Raises CommandError.
    """
    error = status.BAD_SENDER if keyword == "FROM:" else status.BAD_RECIPIENT
    if arg is None or arg[: len(keyword)].upper() != keyword:
        raise CommandError(status.BAD_ARGUMENTS, f"expected {keyword}<address>")
    rest = arg[len(keyword) :].lstrip(" ")
    if rest.startswith("<"):
        close = _find_closing_bracket(rest)
        if close < 0:
            raise CommandError(error, "unterminated path")
        inner, after = rest[1:close], rest[close + 1 :]
        if after and not after.startswith(" "):
            raise CommandError(status.BAD_ARGUMENTS, "text after the path")
    else:
        inner, _, after = rest.partition(" ")
        if not inner:
            raise CommandError(status.BAD_ARGUMENTS, "missing address")
    params = _parse_params(after)
    # Characters first: control characters and UTF-8 decide the reply, whatever else is wrong.
    _check_chars(inner, utf8, error)
    if inner == "":
        if not null_allowed:
            raise CommandError(status.NULL_RECIPIENT)
        return ParsedPath("", "", "", (), params)
    if keyword == "TO:" and inner.lower() == "postmaster":
        # RFC 5321 4.1.1.3 / 4.5.1: RCPT TO:<Postmaster> without a domain MUST be accepted.
        # The domain stays "" here; the front decides which postmaster it means.
        return ParsedPath(inner, inner, "", (), params)
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        route_text, colon, mailbox = inner.partition(":")
        # An IPv6 literal in a route contains colons: re-split after the closing bracket.
        while colon and route_text.count("[") > route_text.count("]"):
            more, colon, mailbox = mailbox.partition(":")
            route_text = f"{route_text}:{more}"
        if not colon:
            raise CommandError(error, "bad source route")
        hops = route_text.split(",")
        if not all(h.startswith("@") and valid_domain(h[1:], utf8) for h in hops):
            raise CommandError(error, "bad source route")
        route = tuple(h[1:].lower() for h in hops)
        inner = mailbox
    local, domain = _split_mailbox(inner, error)
    if not _valid_local(local, utf8):
        raise CommandError(error, f"invalid local part {local!r}")
    if not valid_domain(domain, utf8):
        raise CommandError(error, f"invalid domain {domain!r}")
    domain = domain.lower().rstrip(".")
    return ParsedPath(f"{local}@{domain}", local, domain, route, params)


# ----------------------------------------------------------------------------- ESMTP parameters

_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")


def xtext_valid(value: str) -> bool:
    """RFC 3461 4: printable ASCII except ``+`` and ``=``, with ``+XX`` hex escapes."""
    return bool(_XTEXT.match(value))


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext (``+2B`` is ``+``). The envelope stores the wire form."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


@dataclass(frozen=True)
class MailParams:
    size: int | None
    body: str | None  # "7BIT" | "8BITMIME"
    smtputf8: bool
    ret: str | None  # "FULL" | "HDRS"
    envid: str | None  # xtext, as on the wire


def parse_mail_params(params: Sequence[tuple[str, str | None]], max_size: int) -> MailParams:
    """Validate MAIL FROM parameters; SIZE over `max_size` is 552 5.3.4 (RFC 1870)."""
    seen: set[str] = set()
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    ret: str | None = None
    envid: str | None = None
    for keyword, value in params:
        if keyword in seen:
            raise CommandError(status.BAD_PARAMETER, f"{keyword} given twice")
        seen.add(keyword)
        if keyword == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise CommandError(status.BAD_PARAMETER, "SIZE needs a number")
            size = int(value)
            if size > max_size:
                raise CommandError(status.SIZE_EXCEEDED)
        elif keyword == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise CommandError(status.BAD_PARAMETER.with_text("BODY must be 7BIT or 8BITMIME"))
            body = value.upper()
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise CommandError(status.BAD_PARAMETER.with_text("SMTPUTF8 takes no value"))
            smtputf8 = True
        elif keyword == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise CommandError(status.BAD_PARAMETER.with_text("RET must be FULL or HDRS"))
            ret = value.upper()
        elif keyword == "ENVID":
            if value is None or len(value) > 100 or not xtext_valid(value):
                raise CommandError(status.BAD_PARAMETER.with_text("ENVID must be xtext"))
            envid = value
        elif keyword == "AUTH":
            continue  # RFC 4954 5: accepted; we do not vouch for the identity further
        else:
            raise CommandError(status.UNKNOWN_PARAMETER, f"unknown MAIL parameter {keyword}")
    return MailParams(size, body, smtputf8, ret, envid)


_NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")


@dataclass(frozen=True)
class RcptParams:
    notify: tuple[str, ...]
    orcpt: str | None  # "addr-type;xtext", as on the wire


def parse_rcpt_params(params: Sequence[tuple[str, str | None]]) -> RcptParams:
    """Validate RCPT TO parameters (RFC 3461 4.1 NOTIFY, 4.2 ORCPT)."""
    seen: set[str] = set()
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
    for keyword, value in params:
        if keyword in seen:
            raise CommandError(status.BAD_PARAMETER, f"{keyword} given twice")
        seen.add(keyword)
        if keyword == "NOTIFY":
            words = tuple(w.upper() for w in (value or "").split(","))
            if words == ("NEVER",) or (
                words and all(w in _NOTIFY_WORDS for w in words) and len(set(words)) == len(words)
            ):
                notify = words
            else:
                raise CommandError(
                    status.BAD_PARAMETER.with_text("NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
                )
        elif keyword == "ORCPT":
            addr_type, semi, text = (value or "").partition(";")
            if (
                not semi
                or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", addr_type)
                or not text
                or len(value or "") > 500
                or not xtext_valid(text)
            ):
                raise CommandError(status.BAD_PARAMETER.with_text("ORCPT must be addr-type;xtext"))
            orcpt = f"{addr_type.lower()};{text}"
        else:
            raise CommandError(status.UNKNOWN_PARAMETER, f"unknown RCPT parameter {keyword}")
    return RcptParams(notify, orcpt)


def valid_helo(name: str) -> bool:
    """An EHLO/HELO argument: a domain or address literal (lenient: any printable token)."""
    return bool(name) and all(33 <= ord(c) <= 126 for c in name) and len(name) <= 255
