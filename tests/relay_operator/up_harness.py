"""Helpers for the end-to-end tests of `mailrelay up`: free loopback ports, manifests copied with
their ports moved there, a real `mailrelay up` subprocess with its output captured, SMTP sends
with smtplib, and waits on files the relays write (polling with a deadline: the events happen in
other processes)."""

from __future__ import annotations

import contextlib
import json
import mailbox
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
T = TypeVar("T")


def free_ports(count: int) -> list[int]:
    """Distinct ports free on 127.0.0.1 right now (all held open together while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def load_documents(path: Path) -> list[dict[str, Any]]:
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    docs: list[dict[str, Any]] = []
    for file in files:
        docs.extend(doc for doc in yaml.safe_load_all(file.read_text()) if doc)
    return docs


def declared_ports(docs: Sequence[dict[str, Any]]) -> list[int]:
    ports = set()
    for doc in docs:
        if doc.get("kind") == "MailRelay":
            ports.update(listener["port"] for listener in doc["spec"]["listeners"])
    return sorted(ports)


def move_ports(docs: list[dict[str, Any]], mapping: dict[int, int]) -> list[dict[str, Any]]:
    """Listener ports and loopback smarthost ports moved to free ones (in place)."""
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc.get("kind") == "MailRelay":
            for listener in spec["listeners"]:
                listener["port"] = mapping[listener["port"]]
        if doc.get("kind") == "RelayRoute":
            for hop in [spec.get("nextHop", {}), *spec.get("failover", [])]:
                smarthost = hop.get("smarthost")
                if smarthost and smarthost.get("host") == "127.0.0.1":
                    smarthost["port"] = mapping.get(smarthost["port"], smarthost["port"])
    return docs


def write_documents(path: Path, docs: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def relocated_example(name: str, target: Path) -> tuple[Path, dict[int, int]]:
    """An example's manifests in one file under `target`, its ports moved to free ones."""
    docs = load_documents(EXAMPLES / name)
    ports = declared_ports(docs)
    mapping = dict(zip(ports, free_ports(len(ports)), strict=True))
    return write_documents(target / f"{name}.yaml", move_ports(docs, mapping)), mapping


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, output: Callable[[], str] = str) -> T:
    """Poll `probe` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{output()}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (PID 1 here may not reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


class Up:
    """A real `mailrelay up` subprocess (python -m relay up ...) with captured output."""

    def __init__(
        self, cwd: Path, manifests: Sequence[Path], *extra: str, state_dir: Path | None = None
    ) -> None:
        self.cwd = cwd
        self.state_dir = state_dir or cwd / ".mailrelay"
        self.args = [
            sys.executable,
            "-m",
            "relay",
            "up",
            *(arg for path in manifests for arg in ("-f", str(path))),
            "--state-dir",
            str(self.state_dir),
            *extra,
        ]
        self.lines: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> Up:
        self.process = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-200:])

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "status.json").read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def processes(self, relay: str | None = None) -> list[dict[str, Any]]:
        status = self.status() or {"relays": []}
        return [
            process
            for entry in status["relays"]
            if relay is None or entry["relay"].endswith("/" + relay)
            for process in entry["processes"]
        ]

    def pids(self, relay: str | None = None) -> list[int]:
        return [p["pid"] for p in self.processes(relay) if p["pid"]]

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"mailrelay up exited with {self.process.returncode}\n{self.output()}")
            status = self.status()
            return status if status and status["ready"] and status["pid"] == self.process.pid else None

        return wait_for(ready, timeout, "every relay process to be ready", self.output)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"mailrelay up did not stop within {timeout}s\n{self.output()}") from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def kill_everything(self) -> None:
        """Test clean-up: never leave the supervisor or a relay behind, whatever happened."""
        pids = self.pids()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def running(up: Up) -> Iterator[Up]:
    up.start()
    try:
        yield up
    finally:
        up.kill_everything()


def message(sender: str, recipient: str, subject: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = recipient
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{subject.replace(' ', '-')}@test.example>"
    mail.set_content(f"{subject}\n")
    return mail


def send(
    port: int,
    sender: str,
    recipient: str,
    subject: str,
    login: tuple[str, str] | None = None,
) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        if login is not None:
            client.login(*login)
        client.send_message(message(sender, recipient, subject))


def maildir_messages(folder: Path) -> list[Any]:
    """Messages delivered into a Maildir folder (its new/ and cur/)."""
    if not (folder / "new").is_dir():
        return []
    return list(mailbox.Maildir(folder, create=False))


def find_by_subject(folder: Path, subject: str) -> Any:
    for mail in maildir_messages(folder):
        if mail["Subject"] == subject:
            return mail
    return None
