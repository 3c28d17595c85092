"""Small, structurally valid media files for attachment tests (no external fixtures), and
the parsing those tests share."""

from __future__ import annotations

import struct
import zlib
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser


def parse(content: bytes) -> EmailMessage:
    """The message as the email package's default policy parses it."""
    message = BytesParser(policy=policy.default).parsebytes(content)
    assert isinstance(message, EmailMessage)
    return message


def mixed_parts(content: bytes) -> tuple[EmailMessage, list[EmailMessage], list[str]]:
    """A multipart/mixed message (asserted), its parts and their content types."""
    message = parse(content)
    assert message.get_content_type() == "multipart/mixed"
    parts = list(message.iter_parts())
    return message, parts, [part.get_content_type() for part in parts]


def png(width: int = 2, height: int = 2) -> bytes:
    """A real RGB PNG (signature, IHDR, IDAT, IEND with correct CRCs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([200, 30, 30]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def mp3(frames: int = 4) -> bytes:
    """An ID3v2.4 tag followed by silent MPEG-1 Layer III frames (128 kbit/s, 44.1 kHz)."""
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, 0])
    frame = b"\xff\xfb\x90\x64" + b"\x00" * 413  # 417 bytes per frame at 128 kbit/s
    return tag + frame * frames


def ogg() -> bytes:
    """One Ogg page ("OggS", version 0, BOS) carrying an Opus identification header."""
    payload = b"OpusHead\x01\x01\x38\x01\x80\xbb\x00\x00\x00\x00\x00"
    header = b"OggS\x00\x02" + b"\x00" * 8 + struct.pack("<II", 1, 0) + b"\x00\x00\x00\x00" + b"\x01"
    page = header + bytes([len(payload)]) + payload
    return page


def mp4() -> bytes:
    """An ISO base media file: ftyp box, an empty moov box and a small mdat box."""
    ftyp = struct.pack(">I", 24) + b"ftypisom" + struct.pack(">I", 512) + b"isommp41"
    moov = struct.pack(">I", 8) + b"moov"
    data = bytes(range(256)) * 4
    mdat = struct.pack(">I", 8 + len(data)) + b"mdat" + data
    return ftyp + moov + mdat
