"""Where a message's header section ends (RFC 5322 2.1): the one splitter every module uses.

The header section is every line up to the first empty line; the body follows that empty line.
A message that starts with an empty line has no header; one without an empty line is all
header. A line ends with CRLF, or with a bare LF: the front stores CRLF lines only, but a queue
file written by an older relay, a test or ``mailrelay send --eml`` may not, and the 8-bit
checks of delivery, the returned header of a DSN and ``mailrelay queue show`` must find the
same end as loop detection and ``Bcc`` removal.

Used by relay.core.received (hop count, submission headers), relay.core.compose (Bcc removal),
relay.core.dsn (``text/rfc822-headers``), relay.delivery (SMTPUTF8 and 8BITMIME decisions) and
relay.cli.queue (``queue show``). Pure functions over bytes; no I/O.
"""

from __future__ import annotations


def header_end(content: bytes) -> int:
    """The offset just past the line end of the last header line, where the empty line begins:
    0 when `content` starts with an empty line, ``len(content)`` when it has none."""
    if content[:1] == b"\n" or content[:2] == b"\r\n":
        return 0
    crlf = content.find(b"\n\r\n")  # a line end, then an empty CRLF line
    lf = content.find(b"\n\n", 0, crlf + 1 if crlf >= 0 else len(content))  # an empty LF line first
    if lf >= 0:
        return lf + 1
    if crlf >= 0:
        return crlf + 1
    return len(content)


def header_section(content: bytes) -> bytes:
    """The header section with the line end of its last line, without the empty line."""
    return content[: header_end(content)]


def header_names(headers: bytes) -> list[str]:
    """Lower-cased field names of a header section, in order (continuation lines skipped)."""
    names = []
    for line in headers.split(b"\n"):
        if not line or line[:1] in (b" ", b"\t", b"\r"):
            continue
        name, colon, _ = line.partition(b":")
        if colon:
            names.append(name.strip().decode("latin-1").lower())
    return names
