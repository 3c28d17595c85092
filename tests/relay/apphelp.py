"""Run `mailrelay relay --config FILE` as a real subprocess and follow its log, and what the
tests that do so share: a free loopback port, a config for a relay that sends to one sink, the
config file, the relay run in the test's own event loop (`in_process`), an HTTP GET of the
metrics port, and polling for what no event announces.

The `runs` fixture (tests/conftest.py) kills every `RelayRun` a test started."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from relay.app import RelayProcess
from relay.config import parse_config


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def relay_to_sink_config(
    tmp_path: Path,
    *,
    hostname: str,
    domains: list[str],
    sink_port: int,
    smtp_port: int | None = None,
    metrics_port: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A relay on 127.0.0.1:smtp_port that accepts mail for `domains` (no trusted networks) and
    sends it over the route ``to-sink`` to 127.0.0.1:sink_port; fast retries (1-2 s), the spool
    in tmp_path/queue, metrics on 127.0.0.1:metrics_port (either port: a free one when not
    given). `extra` replaces top-level keys. The result is checked with the relay's own parser
    (a test's config must be valid)."""
    smtp_port = free_port() if smtp_port is None else smtp_port
    metrics_port = free_port() if metrics_port is None else metrics_port
    data: dict[str, Any] = {
        "hostname": hostname,
        "listeners": [{"name": "smtp", "host": "127.0.0.1", "port": smtp_port, "mode": "relay"}],
        "acceptDomains": domains,
        "queue": {
            "directory": str(tmp_path / "queue"),
            "retry": {"minBackoff": "1s", "maxBackoff": "2s", "maxLifetime": "1h"},
        },
        "routes": [
            {
                "name": "to-sink",
                "match": {"recipientDomains": domains},
                "nextHop": {"kind": "relay", "name": "sink", "host": "127.0.0.1", "port": sink_port},
            }
        ],
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "logLevel": "info",
    }
    data.update(extra)
    parse_config(data)
    return data


def ports(data: dict[str, Any]) -> tuple[int, int]:
    """The SMTP port (the first listener's) and the metrics port of a relay_to_sink_config."""
    return int(data["listeners"][0]["port"]), int(data["metrics"]["port"])


def write_config(directory: Path, data: dict[str, Any], name: str = "relay.yaml") -> Path:
    """The config as YAML in directory/name (replacing what was there); returns its path."""
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def in_process(
    path: Path, *, grace: float = 2, serve_health: bool = False
) -> AsyncIterator[RelayProcess]:
    """The relay of the config file at `path` run in this event loop (no file watch), once it
    is ready; on leaving, it is stopped and must exit 0."""
    ready = asyncio.Event()
    process = RelayProcess(
        path,
        parse_config(yaml.safe_load(await asyncio.to_thread(path.read_text))),
        watch=False,
        serve_health=serve_health,
        grace=grace,
        on_ready=ready.set,
    )
    task = asyncio.create_task(process.run())
    try:
        await asyncio.wait_for(ready.wait(), 30)
        yield process
    finally:
        process.stop()
        assert await asyncio.wait_for(task, 30) == 0


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path: (status, body), error statuses included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Await a condition that no event announces (a file another process writes, a scrape, a
    process state): ask it every 50 ms (a coroutine function is awaited), AssertionError after
    `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


class ConfigMapDir:
    """A config file laid out like a mounted ConfigMap: relay.yaml -> ..data/relay.yaml, with
    ..data a symlink to a timestamped directory; `publish` swaps it atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.version = 0
        self.path = directory / "relay.yaml"

    def publish(self, data: dict[str, Any] | str) -> None:
        self.version += 1
        target = self.directory / f"..2024_01_01_00_00_{self.version:02d}"
        target.mkdir()
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        (target / "relay.yaml").write_text(text)
        tmp_link = self.directory / "..data_tmp"
        tmp_link.symlink_to(target.name)
        os.replace(tmp_link, self.directory / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/relay.yaml")

    def start(self, data: dict[str, Any], **options: Any) -> RelayRun:
        """Publish `data` and start a relay that reads it here (`options`: RelayRun's)."""
        self.publish(data)
        return RelayRun(self.path, **options).start()


@dataclass(eq=False)
class RelayRun:
    """A relay subprocess whose combined output is collected line by line."""

    config_path: Path
    _: KW_ONLY
    grace: float = 10.0
    cwd: Path | None = None
    cpus: set[int] | None = None  # the affinity mask of the relay process (and of its workers)
    args: tuple[str, ...] = ()  # more `mailrelay relay` options, e.g. ("--log-format", "json")
    env: dict[str, str] = field(default_factory=dict)  # added to the environment (MAILRELAY_POD_NAME, say)
    lines: list[str] = field(default_factory=list, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    process: subprocess.Popen[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.env = self.env or {}  # None is taken for no additions too

    def start(self) -> RelayRun:
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(self.env)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay",
                "relay",
                "--config",
                str(self.config_path),
                "--grace",
                str(self.grace),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.cwd,
            env=env,
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus or set())) if self.cpus else None,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def count(self, pattern: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def wait_for(self, pattern: str, *, occurrences: int = 1, timeout: float = 30.0) -> str:
        """Block until `pattern` has appeared `occurrences` times in the log; return the line."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if re.search(pattern, line)]
                if len(found) >= occurrences:
                    return found[occurrences - 1]
                remaining = deadline - time.monotonic()
                assert self.process is not None
                if remaining <= 0 or (self.process.poll() is not None and not self._pending_output()):
                    raise AssertionError(f"log line {pattern!r} not seen; log:\n" + "\n".join(self.lines))
                self._cond.wait(min(remaining, 0.5))

    def _pending_output(self) -> bool:
        return False

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)
