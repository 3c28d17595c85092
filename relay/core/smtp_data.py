"""The DATA phase: find the end of the message, undo dot-stuffing, normalise line ends, enforce
the line and size limits. Pure and incremental: `DataDecoder.feed` takes the bytes after the
354 reply in chunks of any size (a line, 64 KiB, one byte) and says where the message ended, so
the front can read the socket in big chunks instead of line by line (aiosmtpd's line-by-line
reading was the main cost of large mail: bench/RESULTS.md, and the "DATA path" row of
docs/RELAY-CORE.md). The encoder for the other direction is relay.core.smtp_payload.

Rules (RFC 5321 4.1.4, 4.5.2 and 2.3.8; RFC 5322 2.1.1):

- Only ``<CRLF>.<CRLF>`` ends the message. ``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CRLF>`` and
  ``<CRLF>.<LF>`` do not (SMTP smuggling, CVE-2023-51764 family): they stay content.
- A bare CR or bare LF inside the content is normalised to CRLF, so nothing ambiguous reaches
  the spool or a next hop (which dot-stuffs the normalised lines again). This is Postfix's
  ``smtpd_forbid_bare_newline = normalize`` choice; rejecting would refuse old Unix mailers.
- A NUL anywhere refuses the message with ``554 5.6.0`` (RFC 5321 forbids it in content and a
  next hop might truncate at it).
- A line longer than 998 octets (without CRLF, after dot-unstuffing and normalising) refuses
  the message with ``554 5.6.0``; more than the size limit refuses it with ``552 5.3.4``. The
  client's data is still read to its end before the reply (RFC 5321 4.2.5 implies it), but
  nothing more is kept in memory once a problem is found.

No I/O, never async.
"""

from __future__ import annotations

import re

from relay.core import status
from relay.core.status import Reply

END = b"\r\n.\r\n"
MAX_LINE = 998
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")


def has_line_longer_than(region: bytes, limit: int) -> bool:
    """Whether a line of `region` (complete CRLF lines) has more than `limit` octets before its
    CRLF. Jumps from line start to the last CRLF within the next ``limit + 2`` octets, so a
    100 KB region of short lines costs about a hundred searches, not a split into 1,300 lines."""
    rfind = region.rfind
    size = len(region)
    start = 0
    while size - start > limit:
        end = rfind(b"\r\n", start, start + limit + 2)
        if end < 0:
            return True
        start = end + 2
    return False


class DataDecoder:
    """Incremental decoder for one DATA transfer. Feed chunks until `feed` returns >= 0."""

    def __init__(self, max_size: int, max_line: int = MAX_LINE) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0  # octets of decoded content kept so far
        self.received = 0  # octets read from the client (for logs)
        self.problem: Reply | None = None
        self.normalized = False  # a bare CR or LF was turned into CRLF
        self.dot_lines = False  # a line started with a dot (it was unstuffed)
        self._parts: list[bytes] = []
        self._partial = b""  # an incomplete last line, starting at a line start if _line_start
        self._line_start = True
        self.done = False

    # ------------------------------------------------------------------ public

    def feed(self, chunk: bytes) -> int:
        """Consume `chunk`; return how many of its bytes belong to the message (end marker
        included) once the end was found, or -1 when more data is needed. Bytes after the
        returned offset are the client's next (pipelined) commands."""
        if self.done:
            raise RuntimeError("feed after end of data")
        self.received += len(chunk)
        carried = len(self._partial)
        data = self._partial + chunk if carried else chunk
        # One search finds both the end marker and the lines that start with a dot (to be
        # unstuffed): ``<CRLF>.`` is rare in mail but for the end marker itself.
        if self._line_start and data.startswith(b".\r\n"):
            end, dot = 0, -1
        else:
            found, dot = _find_end(data)
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            self._take(data[:end], dot >= 0)
            self._partial = b""
            self.done = True
            return end + 3 - carried
        last = data.rfind(b"\r\n")
        if last >= 0:
            self._take(data[: last + 2], 0 <= dot < last)
            self._partial = data[last + 2 :]
            self._line_start = True
        else:
            self._partial = data
        if self.problem is not None and len(self._partial) > 4:
            # Keep just enough to recognise an end marker that spans the next chunk.
            self._partial = self._partial[-4:]
            self._line_start = False
        elif self.size + len(self._partial) > self.max_size:
            self._fail(status.SIZE_EXCEEDED)
            self._partial = self._partial[-4:]
            self._line_start = False
        return -1

    def content(self) -> bytes:
        """The decoded message (CRLF lines), once `feed` has found the end and no problem."""
        if not self.done or self.problem is not None:
            raise RuntimeError("no content: data incomplete or refused")
        return b"".join(self._parts)

    # ------------------------------------------------------------------ internals

    def _fail(self, reply: Reply) -> None:
        if self.problem is None:
            self.problem = reply
        self._parts.clear()

    def _take(self, region: bytes, dots: bool) -> None:
        """Process complete lines (`region` ends with CRLF or is empty; it starts at a line
        start unless a problem already truncated the stream); `dots`: a line after the first
        starts with a dot."""
        if not region or self.problem is not None:
            return
        if not self._line_start:  # only after a problem, handled above; defensive
            return
        if b"\x00" in region:
            self._fail(status.DATA_NUL)
            return
        # Dot-unstuffing (RFC 5321 4.5.2): a leading dot on any CRLF line is removed.
        if region[:1] == b".":
            region = region[1:]
            self.dot_lines = True
        if dots:
            region = region.replace(b"\r\n.", b"\r\n")
            self.dot_lines = True
        crlf = region.count(b"\r\n")
        if region.count(b"\r") != crlf or region.count(b"\n") != crlf:
            region = _ANY_NEWLINE.sub(b"\r\n", region)
            self.normalized = True
        if has_line_longer_than(region, self.max_line):
            self._fail(status.DATA_LINE_TOO_LONG)
            return
        self.size += len(region)
        if self.size > self.max_size:
            self._fail(status.SIZE_EXCEEDED)
            return
        self._parts.append(region)

    @property
    def wire_ready(self) -> bool:
        """Whether the decoded content can go to a next hop as it is, followed by ``.<CRLF>``:
        its lines all end with CRLF (always, after decoding) and none starts with a dot (no
        line was unstuffed, and no bare line end was normalised, which could have made a line
        start with a dot), and there is some (empty content is sent as an empty line). A
        conservative answer: False only costs the sender a scan."""
        clean = not self.dot_lines and not self.normalized
        return self.done and self.problem is None and self.size > 0 and clean


def _find_end(data: bytes) -> tuple[int, int]:
    """(offset of the CRLF before the end marker ``<CRLF>.<CRLF>``, or -1; offset of the first
    ``<CRLF>.`` that is not the end marker, or -1)."""
    dot = -1
    found = data.find(b"\r\n.")
    while found >= 0:
        if data[found + 3 : found + 5] == b"\r\n":
            return found, dot
        if dot < 0:
            dot = found
        found = data.find(b"\r\n.", found + 3)
    return -1, dot
