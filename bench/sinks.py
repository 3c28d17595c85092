"""The far end of every relay under test, and the latency probe.

`CountingSink` runs Postfix's ``smtp-sink -c`` (C, cheap, discards the mail) and reads its
running counter (``sess=N quit=N mesg=N`` after every final dot) from a pipe in a thread,
stamping each increase of ``mesg`` with ``time.monotonic()``: arrivals are counted at the sink,
so a message counts only once it has crossed every hop.

`ProbeSink` and `ProbeSender` measure latency honestly: during a load run the sender submits one
probe message at a time (over its own SMTP session, to ``probe@probe.test``) with a sequence
number in a header; each relay under test routes ``probe.test`` to the probe sink (a small
aiosmtpd server in this process), which stamps the arrival. Latency = arrival - the moment just
before the probe's MAIL FROM, both from this process's monotonic clock. The probes queue behind
the load in the same smtpd/front, spool and delivery paths, so they see what the load sees.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import subprocess
import threading
import time
from typing import Any

from aiosmtpd.controller import Controller

from bench import procs

_MESG = re.compile(rb"mesg=(\d+)")
PROBE_DOMAIN = "probe.test"
PROBE_HEADER = "X-Bench-Probe"


class CountingSink:
    """``smtp-sink -c`` on 127.0.0.1:port, with arrival times of every counted message."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or procs.free_port()
        self.count = 0
        self._times: list[float] = []  # monotonic time at which count reached i+1
        self._cond = threading.Condition()
        self.process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "nobody", "-m", "1024", f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, name="smtp-sink-counter", daemon=True)
        self._reader.start()
        procs.wait_port("127.0.0.1", self.port)

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        stream = self.process.stdout
        pending = b""
        while True:
            chunk = stream.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                return
            now = time.monotonic()
            pending += chunk
            *records, pending = pending.split(b"\r")
            latest = None
            for record in records:
                match = _MESG.search(record)
                if match:
                    latest = int(match.group(1))
            if latest is not None and latest > self.count:
                with self._cond:
                    # several increments read at once share the read time
                    self._times.extend([now] * (latest - self.count))
                    self.count = latest
                    self._cond.notify_all()

    def wait_for(self, total: int, timeout: float, stall: float = 30.0) -> bool:
        """Wait until `total` messages arrived; give up after `timeout`, or after `stall`
        seconds without a new arrival. Returns whether the total was reached."""
        deadline = time.monotonic() + timeout
        with self._cond:
            last_count, last_change = self.count, time.monotonic()
            while self.count < total:
                now = time.monotonic()
                if self.count != last_count:
                    last_count, last_change = self.count, now
                if now > deadline or now - last_change > stall:
                    return False
                self._cond.wait(timeout=0.5)
        return True

    def arrival(self, index: int) -> float:
        """Monotonic time at which message number `index` (1-based, cumulative) arrived."""
        with self._cond:
            return self._times[index - 1]

    def stop(self) -> None:
        if self.process is not None:
            procs.stop_process(self.process)
        if self._reader is not None:
            self._reader.join(timeout=5)


class _ProbeHandler:
    def __init__(self, sink: ProbeSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic()
        content: bytes = envelope.original_content or envelope.content
        head = content[: content.find(b"\r\n\r\n")]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(PROBE_HEADER.lower().encode() + b":"):
                self.sink.arrived(line.split(b":", 1)[1].strip().decode(), now)
        return "250 2.0.0 probe received"


class ProbeSink:
    """aiosmtpd on 127.0.0.1:port that records when each probe id arrives."""

    def __init__(self) -> None:
        self.port = procs.free_port()
        self.arrivals: dict[str, float] = {}
        self._lock = threading.Lock()
        self._controller = Controller(
            _ProbeHandler(self), hostname="127.0.0.1", port=self.port, data_size_limit=0
        )

    def arrived(self, probe_id: str, when: float) -> None:
        with self._lock:
            self.arrivals.setdefault(probe_id, when)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


class ProbeSender:
    """Submits probes one after another (at most one per `interval`) until stopped."""

    def __init__(self, host: str, port: int, size: int, interval: float, tag: str) -> None:
        self.host, self.port, self.interval, self.tag = host, port, interval, tag
        self.size = size
        self.sent: dict[str, float] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe-sender", daemon=True)

    def _message(self, probe_id: str) -> bytes:
        head = (
            f"From: <probe@bench.test>\r\nTo: <probe@{PROBE_DOMAIN}>\r\n"
            f"Subject: latency probe\r\n{PROBE_HEADER}: {probe_id}\r\n\r\n"
        ).encode()
        line = b"x" * 76 + b"\r\n"
        body = line * max(1, (self.size - len(head)) // len(line))
        return head + body

    def _run(self) -> None:
        client: smtplib.SMTP | None = None
        number = 0
        while not self._stop.is_set():
            started = time.monotonic()
            number += 1
            probe_id = f"{self.tag}-{number}"
            try:
                if client is None:
                    client = smtplib.SMTP(self.host, self.port, timeout=60)
                    client.ehlo("probe.bench.test")
                self.sent[probe_id] = time.monotonic()
                client.sendmail("probe@bench.test", [f"probe@{PROBE_DOMAIN}"], self._message(probe_id))
            except (OSError, smtplib.SMTPException):
                self.sent.pop(probe_id, None)
                self.errors += 1
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                client = None
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        if client is not None:
            with contextlib.suppress(Exception):
                client.quit()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def latencies(sender: ProbeSender, sink: ProbeSink, wait: float = 30.0) -> tuple[list[float], int]:
    """Latencies (seconds) of the probes that arrived, and how many never arrived in `wait`."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not set(sender.sent) <= set(sink.arrivals):
        time.sleep(0.05)
    values = [sink.arrivals[pid] - sent for pid, sent in sender.sent.items() if pid in sink.arrivals]
    return sorted(values), len(sender.sent) - len(values)
