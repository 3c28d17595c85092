"""The two relays under test, started the same way: a private Postfix instance and a mailrelay
process, each on its own 127.0.0.1 port, with a durable queue in a temporary directory, relaying
everything to one next hop and ``probe.test`` to the latency probe sink.

Postfix: its own config directory (main.cf + a master.cf derived from Debian's with chroot off
and smtpd on our port), queue and data directories, started with ``postfix -c DIR start`` and
stopped with ``postfix -c DIR stop`` (then SIGKILL by pid for anything left). Its defaults keep
it durable: cleanup fsyncs the queue file before smtpd answers 250.

mailrelay: ``mailrelay relay --config FILE`` with a generated config (trusted 127.0.0.0/8, a
``*`` route to the next hop, spool in the temporary directory, fsync on -- the spool always
fsyncs), ``workers`` processes sharing the port; ready when ``/readyz`` answers 200.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from bench import procs

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Hop:
    """Where a relay sends mail next (always loopback)."""

    host: str
    port: int


class System(Protocol):
    name: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def pids(self) -> list[int]: ...
    def queued(self) -> dict[str, int]: ...


def _count_files(directory: Path) -> int:
    total = 0
    for _root, _dirs, files in os.walk(directory):
        total += len(files)
    return total


# ----------------------------------------------------------------------------- Postfix


def postfix_version() -> str:
    try:
        out = subprocess.run(["postconf", "-d", "mail_version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.split("=", 1)[1].strip()


def _master_cf(port: int) -> str:
    lines = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line[:1].isalnum() and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                line = f"127.0.0.1:{port} inet n - n - - smtpd"
            elif fields[4] == "y":
                fields[4] = "n"  # no chroot: the private queue directory has no chroot files
                line = " ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


class Postfix:
    """A private Postfix instance (own config, queue and data directories)."""

    def __init__(self, name: str, workdir: Path, next_hop: Hop, probe: Hop | None, port: int | None = None):
        self.name = name
        self.dir = workdir / name
        self.port = port or procs.free_port()
        self.next_hop = next_hop
        self.probe = probe
        self._master: int | None = None

    @property
    def etc(self) -> Path:
        return self.dir / "etc"

    def _write_config(self) -> None:
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir / "data", user="postfix")
        transport = ""
        if self.probe is not None:
            transport = f"transport_maps = inline:{{probe.test=smtp:[{self.probe.host}]:{self.probe.port}}}\n"
        (self.etc / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.dir}/queue
data_directory = {self.dir}/data
myhostname = {self.name}.bench.test
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relayhost = [{self.next_hop.host}]:{self.next_hop.port}
{transport}smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_transport = error:local delivery disabled
biff = no
maillog_file_prefixes = {self.dir}
maillog_file = {self.dir}/maillog
smtp_connect_timeout = 5s
"""
        )
        (self.etc / "master.cf").write_text(_master_cf(self.port))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.etc), *args], capture_output=True, text=True, check=False
        )

    def start(self) -> None:
        self._write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            log = (self.dir / "maillog").read_text() if (self.dir / "maillog").exists() else ""
            raise RuntimeError(f"postfix {self.name} did not start: {result.stderr}{log[-2000:]}")
        pid_file = self.dir / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._master = int(pid_file.read_text().split()[0])
        procs.wait_port("127.0.0.1", self.port)

    def stop(self) -> None:
        pids = self.pids()
        self._postfix("stop")
        deadline = time.monotonic() + 15
        while procs.tree(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.kill_tree(pids)

    def pids(self) -> list[int]:
        return [self._master] if self._master is not None else []

    def queued(self) -> dict[str, int]:
        queue = self.dir / "queue"
        return {
            state: _count_files(queue / state) for state in ("incoming", "active", "deferred", "maildrop")
        }


# ----------------------------------------------------------------------------- mailrelay


def mailrelay_command() -> list[str]:
    local = REPO / ".venv" / "bin" / "mailrelay"
    if local.exists():
        return [str(local)]
    found = shutil.which("mailrelay")
    return [found] if found else [sys.executable, "-m", "relay"]


class Mailrelay:
    """``mailrelay relay --config FILE`` with a generated configuration."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        next_hop: Hop,
        probe: Hop | None,
        *,
        workers: int,
        port: int | None = None,
        min_backoff: str = "5m",
        log_level: str = "info",
    ):
        self.name = name
        self.dir = workdir / name
        self.port = port or procs.free_port()
        self.metrics_port = procs.free_port()
        self.next_hop = next_hop
        self.probe = probe
        self.workers = workers
        self.min_backoff = min_backoff
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after = 0.0

    @property
    def spool_dir(self) -> Path:
        return self.dir / "queue"

    def config(self) -> dict[str, object]:
        routes: list[dict[str, object]] = []
        if self.probe is not None:
            routes.append(
                {
                    "name": "probe",
                    "priority": 10,
                    "match": {"recipientDomains": ["probe.test"]},
                    "nextHop": {
                        "kind": "smarthost",
                        "host": self.probe.host,
                        "port": self.probe.port,
                        "tls": "none",
                    },
                }
            )
        routes.append(
            {
                "name": "everything",
                "nextHop": {
                    "kind": "smarthost",
                    "host": self.next_hop.host,
                    "port": self.next_hop.port,
                    "tls": "none",
                },
            }
        )
        return {
            "version": 1,
            "hostname": f"{self.name}.bench.test",
            "listeners": [{"name": "smtp", "host": "127.0.0.1", "port": self.port, "mode": "relay"}],
            "trustedNetworks": ["127.0.0.0/8"],
            "limits": {"maxConnections": 2000, "maxConnectionsPerClient": 1000},
            "queue": {
                "directory": str(self.spool_dir),
                "retry": {"minBackoff": self.min_backoff, "maxBackoff": "1h", "maxLifetime": "5d"},
                "connectTimeout": "5s",
            },
            "routes": routes,
            "metrics": {"host": "127.0.0.1", "port": self.metrics_port},
            "workers": self.workers,
            "logLevel": self.log_level,
        }

    def start(self, wait: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        config_file = self.dir / "relay.yaml"
        config_file.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        log = (self.dir / "relay.log").open("ab")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [*mailrelay_command(), "relay", "--config", str(config_file), "--grace", "5"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Poll /readyz every 10 ms; return seconds from start to the first 200."""
        assert self.process is not None
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mailrelay {self.name} exited with {self.process.returncode}: {self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=2) as response,
            ):
                if response.status == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    procs.wait_port("127.0.0.1", self.port)
                    return self.ready_after
            time.sleep(0.01)
        raise TimeoutError(f"mailrelay {self.name} not ready after {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.dir / "relay.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is None:
            return
        pids = procs.tree([self.process.pid])
        procs.stop_process(self.process, timeout=20)
        procs.kill_tree(pids)

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []

    def queued(self) -> dict[str, int]:
        return {
            state: _count_files(self.spool_dir / state) for state in ("incoming", "active", "deferred", "tmp")
        }
