"""The relay's log lines: plain text (the default under ``mailrelay up``) or one JSON object per
line (``logFormat: json``, what the operator renders for pods), and the mail events in them.

A mail event is an ordinary log record with fields in ``extra``: ``event`` (`accepted`,
`rejected`, `delivered`, `deferred`, `bounced`, `expired`, `dsn`), ``queue_id`` and, as the
event has them, ``sender``, ``recipient``, ``next_hop``, ``route``, ``code``, ``dsn`` (the
enhanced status), ``reply`` (the reply text), ``duration`` (seconds since arrival),
``attempts``, ``size``, ``nrcpt``, ``client``, ``dsn_id`` and ``reason`` (a refusal's
``mailrelay_rejected`` reason). The JSON formatter writes
``time``, ``level``, ``logger``, ``message``, ``relay``, ``pod`` (and ``worker``) and every
event field a record has; the text formatter writes the message only, so event fields cost
nothing there.

Cost on the hot path: the scheduler writes one line per recipient only when `per_recipient()`
is true (JSON); in text it keeps its one summary line per attempt, and no caller builds
``extra`` (text shows none of it). Callers build it only when the logger is enabled for the
level (`logging.Logger.isEnabledFor`), and messages keep %-style arguments, so a disabled level
formats nothing.

`configure` is called once per process by the composition root (relay.app); this module
decides nothing about mail and reads nothing but the environment for the pod's identity
(``MAILRELAY_RELAY``, else the relay's hostname; the pod's name is the caller's,
relay.app.pod_name).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")

# The fields an event record may carry (extra=...), in the order the JSON line shows them.
EVENT_FIELDS = (
    "event",
    "queue_id",
    "sender",
    "recipient",
    "next_hop",
    "route",
    "code",
    "dsn",
    "reply",
    "duration",
    "attempts",
    "size",
    "nrcpt",
    "client",
    "dsn_id",
    "reason",
)
EVENTS = ("accepted", "rejected", "delivered", "deferred", "bounced", "expired", "dsn")

_structured = False


def per_recipient() -> bool:
    """True when the process logs JSON lines: one event line per recipient, and event fields
    worth building (text lines show none of them)."""
    return _structured


class TextFormatter(logging.Formatter):
    """The standard line format with the date and time formatted once per second, not once
    per line (a relay logs two lines per message)."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (RFC 3339, UTC, milliseconds), level, logger, message,
    the process's identity and the record's event fields."""

    def __init__(self, identity: dict[str, Any]) -> None:
        super().__init__()
        self._identity = identity
        self._second = -1
        self._stamp = ""

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self._identity,
        }
        fields = record.__dict__
        for name in EVENT_FIELDS:
            value = fields.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["error"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def identity(relay: str, pod: str, worker: int | None = None) -> dict[str, Any]:
    """The fields every JSON line of this process carries."""
    fields: dict[str, Any] = {"relay": os.environ.get("MAILRELAY_RELAY") or relay, "pod": pod}
    if worker is not None:
        fields["worker"] = worker
    return fields


def configure(fmt: LogFormat, level: str, *, relay: str, pod: str, worker: int | None = None) -> None:
    """Install the format on the root logger's handlers and set the level."""
    global _structured
    # Fields the relay's log lines never show; skipping them halves the cost of a line
    # (the logging documentation's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(identity(relay, pod, worker))
    else:
        prefix = f"[w{worker}] " if worker is not None else ""
        formatter = TextFormatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    for handler in root.handlers:
        handler.setFormatter(formatter)
    _structured = fmt == "json"
    root.setLevel(level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-line chatter
