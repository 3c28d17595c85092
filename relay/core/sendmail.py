"""The decisions of `mailrelay sendmail`, the sendmail-compatible command: its command line, the
message it reads on stdin, the envelope, and the exit status.

- Command line (`parse_args`): getopt-style, as sendmail's and Postfix's (``-ti``, ``-oi``,
  ``-fSENDER`` and ``-f SENDER`` all work). ``-t`` takes recipients from To, Cc and Bcc (added
  to those on the command line, as Postfix does); ``-i`` / ``-oi`` let a line with a single dot
  be content; ``-f`` / ``-r`` the envelope sender; ``-F`` the full name for a From header the
  message lacks; ``--server HOST[:PORT]`` (else ``MAILRELAY_SERVER``, else ``127.0.0.1:25``).
  Options that only tune a local MTA (``-o...``, ``-B``, ``-N``, ``-R``, ``-V``, ``-U``, ``-v``,
  ``-m``, ``-bm``, ``-L``, ``-O``, ``-h``, ``-C``, ``-X``) are accepted and ignored; other modes
  (``-bp``, ``-bs``, ``-bv``, ``-bd``, ``-q``, ...) are a usage error.
- The message (`prepare`): line ends made CRLF; without ``-i`` input ends at a line with a
  single dot; a missing From (``-F`` NAME and the sender), Date and Message-ID are added; Bcc
  fields are always removed (relay.core.compose.load_eml, whose address rules apply). The
  envelope sender is ``-f``, else the From address, else ``USER@HOSTNAME``.
- Exit status (sysexits.h): 0 every recipient accepted; 64 usage (also: no recipients); 65
  the message (unreadable addresses, refused as content at DATA, a 5xx to the sender); 67 a
  recipient refused with 5xx; 69 the relay unreachable (or refusing the session, TLS, AUTH);
  75 a temporary refusal (4xx) or a session that broke off.

Pure: no I/O; the user, host name, time and Message-ID token are arguments. relay.cli.sendmail
reads stdin and the environment and submits with relay.submit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formataddr, getaddresses

from relay.core.compose import ComposeError, Submission, load_eml

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75

DEFAULT_SERVER = "127.0.0.1:25"
_HEADER_LINE = re.compile(rb"[!-9;-~]+:")  # RFC 5322 2.2 field name and colon

_FLAGS = set("timvUnG")  # options without an argument
_WITH_ARGUMENT = set("fFroNRVBCXLOhb")  # options that take one (attached or the next word)


class UsageError(ValueError):
    """Exit 64: the command line cannot be used; the text says what to change."""


class MessageError(ValueError):
    """Exit 65: the message read on stdin cannot be sent; the text says why."""


@dataclass(frozen=True)
class SendmailArgs:
    recipients: tuple[str, ...] = ()
    from_headers: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    server: str | None = None  # --server
    verbose: bool = False  # -v


def parse_args(argv: Sequence[str]) -> SendmailArgs:
    """The command line after the program name; UsageError for what sendmail would refuse."""
    recipients: list[str] = []
    values: dict[str, str] = {}  # sender, full_name, server
    flags: set[str] = set()  # t, i, v
    words = list(argv)
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--":
            recipients.extend(words[index:])
            break
        if word.startswith("--server"):
            if word.startswith("--server="):
                values["server"] = word.split("=", 1)[1]
            elif index < len(words):
                values["server"] = words[index]
                index += 1
            else:
                raise UsageError("--server needs HOST[:PORT]")
            continue
        if word.startswith("--"):
            raise UsageError(f"unknown option {word}")
        if not word.startswith("-") or word == "-":
            recipients.append(word)
            continue
        letters = word[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in _FLAGS:
                flags.add(letter)
                continue
            if letter in _WITH_ARGUMENT or letter == "q":
                argument = letters
                letters = ""
                if not argument and letter != "q":
                    if index >= len(words):
                        raise UsageError(f"option -{letter} needs a value")
                    argument = words[index]
                    index += 1
                _option(letter, argument, values, flags)
                continue
            raise UsageError(f"unknown option -{letter} (see mailrelay sendmail --help)")
    return SendmailArgs(
        recipients=tuple(recipients),
        from_headers="t" in flags,
        ignore_dots="i" in flags,
        sender=values.get("sender"),
        full_name=values.get("full_name"),
        server=values.get("server"),
        verbose="v" in flags,
    )


def _option(letter: str, argument: str, values: dict[str, str], flags: set[str]) -> None:
    if letter in "fr":
        values["sender"] = argument
    elif letter == "F":
        values["full_name"] = argument
    elif letter == "o":
        if argument == "i":
            flags.add("i")
    elif letter == "b":
        if argument != "m":
            raise UsageError(
                f"-b{argument}: only -bm (deliver mail, the default) is supported; use mailrelay queue"
            )
    elif letter == "q":
        raise UsageError("-q: there is no local queue to run; use mailrelay queue on the relay")
    # -N -R -V -B -C -X -L -O -h: tune a local MTA; accepted and ignored


def parse_server(value: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``; UsageError otherwise."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "25"
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        host, port = text, "25"  # a bare IPv6 address
    else:
        host, port = text, "25"
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--server {value!r}: use HOST[:PORT], e.g. 127.0.0.1:25")
    return host, int(port)


def read_input(data: bytes, *, ignore_dots: bool) -> bytes:
    """The message from stdin's bytes: without -i it ends at a line holding a single dot."""
    if ignore_dots:
        return data
    lines = data.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if line.rstrip(b"\r\n") == b".":
            return b"".join(lines[:number])
    return data


def prepare(
    data: bytes,
    args: SendmailArgs,
    *,
    user: str,
    hostname: str,
    now: datetime,
    token: str,
) -> Submission:
    """The envelope and the bytes to submit; UsageError (64) or MessageError (65)."""
    if not args.recipients and not args.from_headers:
        raise UsageError("no recipients: give recipients or -t")
    content = read_input(data, ignore_dots=args.ignore_dots)
    if not content.strip():
        raise MessageError("the message on stdin is empty")
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(content)
    header_from = [a for _, a in getaddresses([str(v) for v in headers.get_all("From", [])]) if a]
    sender = (
        args.sender if args.sender is not None else (header_from[0] if header_from else f"{user}@{hostname}")
    )
    added = b""
    if headers.get("From") is None:
        added += f"From: {formataddr((args.full_name or '', sender))}\r\n".encode()
    if headers.get("Date") is None:
        added += f"Date: {format_datetime(now)}\r\n".encode("ascii")
    if headers.get("Message-ID") is None:
        domain = sender.rpartition("@")[2] or hostname
        added += f"Message-ID: <{token}@{domain}>\r\n".encode("utf-8", "replace")
    if not _HEADER_LINE.match(content):  # no header section at all: the body starts at once
        added += b"\r\n"
    recipients = list(args.recipients)
    if args.from_headers:
        values = [str(v) for name in ("To", "Cc", "Bcc") for v in headers.get_all(name, [])]
        # empty entries are groups such as "undisclosed-recipients:;"; the rest must be
        # addresses (load_eml checks each one)
        recipients.extend(address for _display, address in getaddresses(values) if address)
    if not recipients:
        hint = "no recipients in To, Cc or Bcc" if args.from_headers else "give recipients or -t"
        raise UsageError(f"no recipients: {hint}")
    try:
        return load_eml(added + content, mail_from=sender, recipients=recipients)
    except ComposeError as exc:
        raise MessageError(str(exc).replace("--from", "-f").replace("--to", "recipient")) from exc


# --------------------------------------------------------------------------- exit status


def status_for_failure(kind: str, code: int | None) -> int:
    """The exit status when the submission failed as a whole (relay.submit.SubmitError)."""
    if kind == "connect":
        return EX_UNAVAILABLE
    if code is not None and 400 <= code < 500:
        return EX_TEMPFAIL
    if kind == "sender" or (kind == "extension" and code == 552):
        return EX_DATAERR
    if kind in ("greeting", "tls", "auth", "extension"):
        return EX_UNAVAILABLE
    return EX_TEMPFAIL  # the session broke off: try again


def status_for_recipients(results: Sequence[tuple[bool, int, str]]) -> int:
    """The exit status from per-recipient (accepted, reply code, stage ``rcpt``/``data``)."""
    if any(not ok and code >= 500 and stage == "rcpt" for ok, code, stage in results):
        return EX_NOUSER
    if any(not ok and code >= 500 for ok, code, _stage in results):
        return EX_DATAERR
    if any(not ok for ok, _code, _stage in results):
        return EX_TEMPFAIL
    return EX_OK
