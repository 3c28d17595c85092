"""Shared machinery for the fault, hostile-input and peer suites: a next-hop SMTP sink that runs
in its own thread (so it keeps answering while a test blocks or a relay process is killed), a
relay process (`mailrelay relay --config FILE` as a subprocess, via tests.relay.apphelp), a
config builder, a raw byte-level client and the figures recorder.

The sink counts every message it stores, keyed by the ``X-Token`` header the tests put in each
message, so a test can say exactly how many were lost (accepted with 250, never arrived) and
how many were duplicated (arrived more than once). It can also misbehave on purpose: answer the
final dot only after a delay, drop the connection after the final dot, answer 4xx.

Figures: `delivery_figures` counts accepted, delivered, lost and duplicated messages;
`record_figures(case, **numbers)` merges measured numbers into a JSON file
(``$MAILRELAY_FIGURES``, default ``<tmp>/mailrelay-reliability.json``); `tests/faults/report.py`
renders that file into docs/RELIABILITY.md. Only ever listens on and connects to 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import parse_config
from tests.relay.apphelp import RelayRun, free_port, write_config

TOKEN = re.compile(rb"^X-Token: (\S+)\r?$", re.MULTILINE)


def message_with_token(token: str, body: bytes = b"hello\r\n", extra_headers: bytes = b"") -> bytes:
    return (
        b"From: sender@sender.test\r\nTo: user@example.com\r\nSubject: fault test\r\n"
        + f"X-Token: {token}\r\n".encode()
        + extra_headers
        + b"\r\n"
        + body
    )


# ----------------------------------------------------------------------------- the sink


@dataclass
class Arrival:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    token: str | None
    at: float = field(default_factory=time.monotonic)


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        content = envelope.original_content or b""
        with sink.cond:
            sink.transactions += 1
            reply = sink.data_replies.pop(0) if sink.data_replies else "250 2.0.0 stored"
            drop = sink.drop_after_dot > 0
            if drop:
                sink.drop_after_dot -= 1
            delay = sink.data_delay
        if reply.startswith("2"):
            match = TOKEN.search(content)
            arrival = Arrival(
                mail_from="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                content=content,
                token=match.group(1).decode() if match else None,
            )
            with sink.cond:
                sink.messages.append(arrival)
                sink.cond.notify_all()
        if drop:
            # Stored, but the client never hears it: the connection goes away after the dot.
            if server.transport is not None:
                server.transport.abort()
            return "250 2.0.0 never seen"
        if delay:
            await asyncio.sleep(delay)
        return reply


class Sink:
    """An aiosmtpd server on 127.0.0.1 in a background thread; `stop()` then `start()` brings
    it back on the same port (a next hop that was down)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        assert host.startswith("127.")
        self.host = host
        self.port = port or free_port()
        self.messages: list[Arrival] = []
        self.transactions = 0
        self.connections = 0
        self.data_replies: list[str] = []
        self.drop_after_dot = 0
        self.data_delay = 0.0
        self.cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def _factory(self) -> SMTP:
        with self.cond:
            self.connections += 1
        protocol = SMTP(
            _Handler(self),
            hostname="sink.test",
            decode_data=False,
            enable_SMTPUTF8=True,
            ident="sink",
            timeout=900,
        )
        self._sessions.add(protocol)
        return protocol

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(30)

    def start(self) -> Sink:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="sink")
            self._thread.start()

        async def serve() -> asyncio.base_events.Server:
            loop = asyncio.get_running_loop()
            return await loop.create_server(self._factory, host=self.host, port=self.port, reuse_address=True)

        self._server = self._call(serve())
        return self

    def stop(self) -> None:
        """Stop listening and cut every open session (the next hop goes down)."""
        server = self._server
        if server is None:
            return
        self._server = None

        async def close() -> None:
            server.close()
            for session in list(self._sessions):  # Server.close_clients() is Python 3.13+
                if session.transport is not None:
                    session.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

        self._call(close())

    def shutdown(self) -> None:
        self.stop()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    # ------------------------------------------------------------------ what arrived

    def tokens(self) -> collections.Counter[str]:
        with self.cond:
            return collections.Counter(m.token for m in self.messages if m.token is not None)

    def wait(self, predicate: Callable[[Sink], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    count = len(self.messages)
                    raise AssertionError(f"sink: condition not met in {timeout:.0f}s ({count} messages)")
                self.cond.wait(min(remaining, 1.0))

    def wait_count(self, count: int, timeout: float = 60.0) -> None:
        self.wait(lambda sink: len(sink.messages) >= count, timeout)

    def wait_tokens(self, tokens: set[str], timeout: float = 60.0) -> None:
        self.wait(lambda sink: tokens <= {m.token for m in sink.messages}, timeout)


@contextlib.contextmanager
def running_sink(host: str = "127.0.0.1", port: int = 0) -> Iterator[Sink]:
    sink = Sink(host, port).start()
    try:
        yield sink
    finally:
        sink.shutdown()


# ----------------------------------------------------------------------------- relay config


def relay_hop(name: str, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """A ``relay`` next hop (plain SMTP to host:port)."""
    return {"kind": "relay", "name": name, "host": host, "port": port}


def relay_config(
    tmp_path: Path,
    *,
    smtp_port: int,
    next_hop_port: int | None = None,
    next_hop_host: str = "127.0.0.1",
    accept_domains: list[str] | None = None,
    trusted: list[str] | None = None,
    routes: list[dict[str, Any]] | None = None,
    queue: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    submission_port: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A relay on 127.0.0.1:smtp_port: every recipient to the next hop, fast retries. With
    `submission_port`, a second listener ``submission`` there: STARTTLS, AUTH required (RFC
    6409; the caller gives ``tls`` and ``auth``)."""
    if routes is None:
        assert next_hop_port is not None
        routes = [{"name": "to-next-hop", "nextHop": relay_hop("next", next_hop_port, next_hop_host)}]
    listeners: list[dict[str, Any]] = [
        {"name": "smtp", "host": "127.0.0.1", "port": smtp_port, "mode": "relay"}
    ]
    if submission_port is not None:
        listeners.append(
            {
                "name": "submission",
                "host": "127.0.0.1",
                "port": submission_port,
                "mode": "submission",
                "tls": "starttls",
                "auth": "required",
            }
        )
    queue_data: dict[str, Any] = {
        "directory": str(tmp_path / "queue"),
        "retry": {"minBackoff": "1s", "maxBackoff": "2s", "maxLifetime": "1h"},
        "connectTimeout": "5s",
    }
    queue_data.update(queue or {})
    data: dict[str, Any] = {
        "hostname": "relay.faults.test",
        "listeners": listeners,
        "trustedNetworks": trusted if trusted is not None else ["127.0.0.0/8"],
        "acceptDomains": accept_domains or ["example.com"],
        "queue": queue_data,
        "routes": routes,
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "limits": limits or {},
        "logLevel": "info",
    }
    data.update(extra)
    parse_config(data)  # the test's own config must be valid
    return data


class Relay:
    """`mailrelay relay --config FILE` as a subprocess that can be killed and started again on
    the same config (and so the same port and spool)."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], *, grace: float = 10.0, name: str = "relay"):
        self.path = write_config(tmp_path, config, f"{name}.yaml")
        self.config = config
        self.port = int(config["listeners"][0]["port"])
        self.queue = Path(config["queue"]["directory"])
        self.grace = grace
        self.runs: list[RelayRun] = []

    @property
    def run(self) -> RelayRun:
        return self.runs[-1]

    def start(self, timeout: float = 60.0) -> Relay:
        run = RelayRun(self.path, grace=self.grace).start()
        self.runs.append(run)
        run.wait_for(r"ready \(pid", timeout=timeout)
        return self

    async def astart(self, timeout: float = 60.0) -> Relay:  # noqa: ASYNC109
        return await asyncio.to_thread(self.start, timeout)

    def sigkill(self) -> None:
        self.run.kill()

    def queued(self) -> int:
        """Messages still in the spool (any state), counted from the files on disk."""
        total = 0
        for state in ("incoming", "active", "deferred", "hold"):
            directory = self.queue / state
            if directory.is_dir():
                total += sum(1 for p in directory.iterdir() if not p.name.startswith("."))
        return total

    def wait_queue_empty(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() > deadline:
                raise AssertionError(f"queue not empty after {timeout:.0f}s: {self.queued()} left")
            time.sleep(0.1)

    def log(self) -> str:
        return "\n".join(run.log for run in self.runs)

    def assert_no_traceback(self) -> None:
        text = self.log()
        assert "Traceback" not in text, text[-6000:]
        assert "internal error" not in text, text[-6000:]

    def stop(self) -> None:
        """Kill what still runs and print the log (pytest shows it when the test failed)."""
        for run in self.runs:
            run.kill()
        print(f"----- {self.path.name} log (last 200 lines) -----")
        print("\n".join(self.log().splitlines()[-200:]))


# ----------------------------------------------------------------------------- clients


async def send_one(
    port: int,
    token: str,
    *,
    rcpt: str = "user@example.com",
    sender: str = "sender@sender.test",
    source: str | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> str:
    """One message over one session; returns the text of the 250 reply (raises otherwise)."""
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        start_tls=False,
        timeout=timeout,
        source_address=(source, 0) if source else None,
    )
    await smtp.connect()
    try:
        _errors, text = await smtp.sendmail(sender, [rcpt], message_with_token(token))
    finally:
        with contextlib.suppress(Exception):
            await smtp.quit()
    return text


class RawSession:
    """Exact bytes to the relay and its replies back (what smtplib refuses to send)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    def connect(cls, port: int, source: str | None = None, timeout: float = 30.0) -> RawSession:
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by the relay; got " + repr(lines))
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\n")
            text = line.decode("utf-8", "replace").rstrip("\r")
            lines.append(text)
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def replies_until_closed(self) -> list[tuple[int, str]]:
        out = []
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                out.append(self.reply())
        return out

    def closed(self) -> bool:
        """True when the relay closed the connection (EOF), after any remaining replies."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- figures


def delivery_figures(accepted: set[str], arrived: collections.Counter[str]) -> dict[str, int]:
    """What became of the messages the relay answered 250 for (`accepted`, by token), counted
    at the sink (`arrived`, token -> copies): delivered (accepted and arrived), lost (accepted,
    never arrived) and duplicated (copies beyond the first)."""
    return {
        "accepted": len(accepted),
        "delivered": len(set(arrived) & accepted),
        "lost": len(accepted - set(arrived)),
        "duplicated": sum(n - 1 for n in arrived.values()),
    }


def figures_path() -> Path:
    default = Path(tempfile.gettempdir()) / "mailrelay-reliability.json"
    return Path(os.environ.get("MAILRELAY_FIGURES", default))


def record_figures(case: str, **numbers: Any) -> None:
    """Merge the measured numbers of one case into the figures file (last run wins)."""
    path = figures_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            data = {}
        data[case] = {**numbers, "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
