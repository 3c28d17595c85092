"""A private Postfix instance for interop tests: its own config, queue and data directories
under the test's tmp directory, smtpd on one 127.0.0.1 port, started with
``postfix -c DIR start`` and stopped with ``postfix -c DIR stop`` (NOTES.md). Nothing listens
on any other address and it delivers nothing locally (mydestination is empty): mail goes where
``transport_maps`` or ``relayhost`` say, always to loopback ports.

Needs root (as CI runs) and Debian's postfix package (``make system-deps``); `available()` says
why not otherwise, for a skip that names the reason."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# /usr/sbin is not on every PATH (CI shells, sudo -E): look there too.
POSTFIX = shutil.which("postfix") or next(
    (p for p in ("/usr/sbin/postfix", "/sbin/postfix") if os.access(p, os.X_OK)), None
)


def available() -> str | None:
    """None when a private Postfix can run here, else the reason it cannot."""
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
    def __init__(
        self,
        directory: Path,
        port: int,
        *,
        hostname: str = "postfix.peers.test",
        transports: dict[str, str] | None = None,
        relayhost: str = "",
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.dir = directory
        self.port = port
        self.hostname = hostname
        self.transports = transports or {}
        self.relayhost = relayhost
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
                "smtpd_tls_security_level = may\n"
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
{transport}{tls}smtp_tls_security_level = may
smtpd_relay_restrictions = permit_mynetworks, reject
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
        self._write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            raise RuntimeError(f"postfix did not start: {result.stdout}{result.stderr}{self.maillog[-3000:]}")
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
                        f"postfix not listening on {self.port}: {self.maillog[-3000:]}"
                    ) from None
                time.sleep(0.1)

    def queue_files(self) -> int:
        total = 0
        for state in ("incoming", "active", "deferred", "maildrop", "hold"):
            directory = self.dir / "queue" / state
            if directory.is_dir():
                total += sum(len(files) for _root, _dirs, files in os.walk(directory))
        return total

    def stop(self) -> None:
        self._postfix("stop")
        if self.master_pid is None:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(self.master_pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.master_pid, signal.SIGKILL)  # only the master this test started
