"""The two relays under test, started the same way: a private Postfix instance and a mailrelay
process, each on its own 127.0.0.1 port, with a durable queue in a temporary directory, relaying
everything to one next hop and ``probe.test`` to the latency probe sink.

Postfix: `PrivatePostfix`, its own config directory (main.cf + a master.cf derived from Debian's
with chroot off and smtpd on our port), queue and data directories, started with
``postfix -c DIR start`` and stopped with ``postfix -c DIR stop`` (then SIGKILL by pid for anything
left). Its defaults keep it durable: cleanup fsyncs the queue file before smtpd answers 250. The
interop tests (tests/peers) start their Postfix with this same class; the benchmark imports
nothing from tests/.

mailrelay: ``mailrelay relay --config FILE`` with a generated config (trusted 127.0.0.0/8, a
``*`` route to the next hop, spool in the temporary directory, fsync on -- the spool always
fsyncs), ``workers`` processes sharing the port; ready when ``/readyz`` answers 200.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
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


# /usr/sbin is not on every PATH (CI shells, sudo -E): look there too.
POSTFIX = shutil.which("postfix") or next(
    (p for p in ("/usr/sbin/postfix", "/sbin/postfix") if os.access(p, os.X_OK)), None
)
POSTFIX_QUEUES = ("incoming", "active", "deferred", "maildrop", "hold")


def private_postfix_unavailable() -> str | None:
    """None when a private Postfix can run here, else the reason it cannot (for a skip)."""
    if POSTFIX is None:
        return "postfix is not installed (make system-deps)"
    if os.geteuid() != 0:
        return "a private Postfix master needs root"
    return None


def _master_cf(port: int) -> str:
    """Debian's master.cf with smtpd on 127.0.0.1:port and chroot off (the private queue
    directory has no chroot files)."""
    lines = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line[:1].isalnum() and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                line = f"127.0.0.1:{port} inet n - n - - smtpd"
            elif fields[4] == "y":
                fields[4] = "n"
                line = " ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


class PrivatePostfix:
    """A private Postfix instance, the one launcher of the benchmark and of the interop tests
    (tests/peers): its own config, queue and data directories under `directory`, smtpd on
    127.0.0.1:port only, nothing delivered locally (mydestination is empty): mail goes where
    `transports` (domain -> transport, a ``transport_maps`` inline table) or `relayhost` say.

    With `cert_file` and `key_file` it offers STARTTLS (smtpd) and uses TLS when the next hop
    offers it (smtp, ``may``); without them it does no TLS in either direction. Needs root and
    Debian's postfix package (`private_postfix_unavailable` says why not otherwise)."""

    def __init__(
        self,
        directory: Path,
        port: int,
        *,
        hostname: str,
        relayhost: str = "",
        transports: dict[str, str] | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.dir = directory
        self.port = port
        self.hostname = hostname
        self.relayhost = relayhost
        self.transports = transports or {}
        self.cert_file = cert_file
        self.key_file = key_file
        self.master_pid: int | None = None

    @property
    def etc(self) -> Path:
        return self.dir / "etc"

    @property
    def maillog(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def _write_config(self) -> None:
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir / "data", user="postfix")
        transport = ""
        if self.transports:
            inline = ", ".join(f"{domain}={target}" for domain, target in self.transports.items())
            transport = f"transport_maps = inline:{{{inline}}}\n"
        tls = ""
        if self.cert_file is not None and self.key_file is not None:
            tls = (
                f"smtpd_tls_cert_file = {self.cert_file}\nsmtpd_tls_key_file = {self.key_file}\n"
                "smtpd_tls_security_level = may\nsmtp_tls_security_level = may\n"
            )
        (self.etc / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.dir}/queue
data_directory = {self.dir}/data
myhostname = {self.hostname}
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relayhost = {self.relayhost}
{transport}{tls}smtpd_relay_restrictions = permit_mynetworks, reject
smtputf8_enable = yes
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
            [POSTFIX or "postfix", "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def start(self, timeout: float = 60.0) -> PrivatePostfix:
        """``postfix -c DIR start``; return once the master's pid is known and smtpd accepts."""
        self._write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            raise RuntimeError(
                f"postfix {self.hostname} did not start: {result.stdout}{result.stderr}{self.maillog[-3000:]}"
            )
        pid_file = self.dir / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.master_pid = int(pid_file.read_text().split()[0])
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    return self
            except (OSError, ValueError, IndexError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postfix {self.hostname} not listening on {self.port}: {self.maillog[-3000:]}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """``postfix -c DIR stop``, then SIGKILL by pid for whatever of this master's process
        tree is still alive after 15 s (and only that)."""
        pids = procs.tree([self.master_pid]) if self.master_pid is not None else []
        self._postfix("stop")
        deadline = time.monotonic() + 15
        while procs.tree(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.kill_tree(pids)

    def queued(self, states: tuple[str, ...] = POSTFIX_QUEUES) -> dict[str, int]:
        """Files in each queue directory (a message is one file)."""
        return {state: _count_files(self.dir / "queue" / state) for state in states}


class Postfix:
    """The benchmark's Postfix: a `PrivatePostfix` relaying everything to `next_hop` and
    ``probe.test`` to the latency probe."""

    def __init__(self, name: str, workdir: Path, next_hop: Hop, probe: Hop | None, port: int | None = None):
        self.name = name
        self.port = port or procs.free_port()
        transports = {}
        if probe is not None:
            transports["probe.test"] = f"smtp:[{probe.host}]:{probe.port}"
        self.instance = PrivatePostfix(
            workdir / name,
            self.port,
            hostname=f"{name}.bench.test",
            relayhost=f"[{next_hop.host}]:{next_hop.port}",
            transports=transports,
        )

    def start(self) -> None:
        self.instance.start()

    def stop(self) -> None:
        self.instance.stop()

    def pids(self) -> list[int]:
        master = self.instance.master_pid
        return [master] if master is not None else []

    def queued(self) -> dict[str, int]:
        return self.instance.queued(("incoming", "active", "deferred", "maildrop"))


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
