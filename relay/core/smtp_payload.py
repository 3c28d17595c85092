"""The DATA payload a client sends after the 354 reply: the encoder beside relay.core.smtp_data's
decoder.

RFC 5321 4.5.2: every line that starts with a dot gets one more dot (dot-stuffing), every line
ends with CRLF, and ``.<CRLF>`` ends the content. Feeding a payload to
`relay.core.smtp_data.DataDecoder` gives back the content with its line ends normalised (the
round trip is a test).

Two paths, one result: content whose line ends are all CRLF and which ends with CRLF (what the
front stores) is stuffed with bytes operations only (`clean_payload`; a regular expression
over a 100 KB message per delivery, as aiosmtplib's ``data()`` does, cost a third of the
relay's CPU for large mail); anything else has its lone CR and LF turned into CRLF first
(`normalised_payload`, regular expressions); content the front already checked on arrival
(`wire_ready`) is not scanned at all. relay.delivery calls `data_payload`.

Pure functions over bytes; no I/O.
"""

from __future__ import annotations

import re

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def data_payload(content: bytes, *, wire_ready: bool = False) -> bytes:
    """What follows the 354 reply for `content`: dot-stuffed CRLF lines and the final dot.
    `wire_ready`: the caller knows the content is CRLF lines, none starting with a dot (the
    front checked it on arrival: relay.core.model.QueueEntry.wire_ready), so the body is not
    scanned again (for a 100 KB message the scan was a tenth of the relay's CPU)."""
    if wire_ready:
        return content + b".\r\n"
    payload = clean_payload(content)
    return payload if payload is not None else normalised_payload(content)


def clean_payload(content: bytes) -> bytes | None:
    """The payload of CRLF-clean content (every line ends with CRLF, and so does the content);
    None for any other content."""
    crlf = content.count(b"\r\n")
    if not content.endswith(b"\r\n") or content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        return None
    if content.startswith(b"."):
        content = b"." + content
    if b"\r\n." in content:
        content = content.replace(b"\r\n.", b"\r\n..")
    return content + b".\r\n"


def normalised_payload(content: bytes) -> bytes:
    """The payload of any content: lone CR and LF become CRLF, a CRLF is added at the end, lines
    starting with a dot are stuffed, the final dot follows (what aiosmtplib's ``data()`` sent)."""
    content = _LINE_ENDS.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return _LEADING_DOT.sub(b"..", content) + b".\r\n"
