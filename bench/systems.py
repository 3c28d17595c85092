"""The two relays under test, each on its own 127.0.0.1 port with a durable queue in the
benchmark's work directory, relaying everything to one next hop and ``probe.test`` to the
latency probe sink.

Postfix: `PrivatePostfix`, its own config directory (main.cf and master.cf from
bench.postfix_config, in one of its variants), queue and data directories, started with
``postfix -c DIR start`` and stopped with ``postfix -c DIR stop`` (then SIGKILL by pid for
anything left). Every variant keeps it durable: cleanup fsyncs the queue file before smtpd
answers 250. The interop tests (tests/peers) start their Postfix with this same class; the
benchmark imports nothing from tests/.

mailrelay: `MailrelaySet`, MailRelay and RelayRoute manifests (bench.manifests: the spec's
defaults) rendered by `mailrelay up`'s own planner (relay_operator.local.plan.build_plan), then
either each replica started the way `up` starts it (``python -m relay relay --config FILE``,
launch ``relay``, the default: what a pod runs) or the whole set under ``mailrelay up`` itself
(launch ``up``: its supervisor also reads every log line the relays write and prints them).
Ready when every replica's ``/readyz`` answers 200.

Every process is stopped by pid (or by the process group the launcher made), never by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from bench import procs
from bench.manifests import NAMESPACE, Hop, RelayDef, documents, per_process_destination
from bench.postfix_config import (
    DEFAULT_VARIANT,
    SHIPPED_DESTINATION_CONCURRENCY,
    VARIANTS,
    PostfixVariant,
    TlsFiles,
    main_cf,
    master_cf,
)

REPO = Path(__file__).resolve().parent.parent

__all__ = [
    "NAMESPACE",
    "REPO",
    "Hop",
    "MailrelaySet",
    "MailrelaySettings",
    "Postfix",
    "PostfixSettings",
    "PrivatePostfix",
    "RelayDef",
    "System",
    "one_mailrelay",
    "postfix_version",
    "private_postfix_unavailable",
]


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
DEBIAN_MASTER_CF = Path("/etc/postfix/master.cf")
_NUMBERS = re.compile(r"\d+")


def private_postfix_unavailable() -> str | None:
    """None when a private Postfix can run here, else the reason it cannot (for a skip)."""
    if POSTFIX is None:
        return "postfix is not installed (make system-deps)"
    if os.geteuid() != 0:
        return "a private Postfix master needs root"
    return None


def _variant(value: PostfixVariant | str) -> PostfixVariant:
    if isinstance(value, PostfixVariant):
        return value
    try:
        return VARIANTS[value]
    except KeyError:
        raise ValueError(f"unknown Postfix variant {value!r}: one of {', '.join(VARIANTS)}") from None


class PrivatePostfix:
    """A private Postfix instance, the one launcher of the benchmark and of the interop tests
    (tests/peers): its own config, queue and data directories under `directory`, smtpd on
    127.0.0.1:port only, nothing delivered locally (mydestination is empty): mail goes where
    `transports` (domain -> transport, a ``transport_maps`` inline table) or `relayhost` say.

    `variant` (bench.postfix_config.VARIANTS) chooses master.cf and the tuning; the default,
    ``debian``, is Postfix as Debian ships it (what the interop tests talk to); the benchmark
    passes its own (`PostfixSettings`, default the best measured). `smtputf8` is on by
    default, because interop callers send SMTPUTF8; the benchmark passes its variant's choice
    (its load sends none). `destination_concurrency`
    sets ``default_destination_concurrency_limit`` (None: Postfix's shipped 20). `overrides`
    are further main.cf parameters (experiments).

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
        variant: PostfixVariant | str = "debian",
        smtputf8: bool = True,
        destination_concurrency: int | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> None:
        self.dir = directory
        self.port = port
        self.hostname = hostname
        self.relayhost = relayhost
        self.transports = transports or {}
        self.cert_file = cert_file
        self.key_file = key_file
        self.variant = _variant(variant)
        self.smtputf8 = smtputf8
        self.destination_concurrency = destination_concurrency
        self.overrides = dict(overrides or {})
        self.master_pid: int | None = None

    @property
    def etc(self) -> Path:
        return self.dir / "etc"

    @property
    def maillog(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def warnings(self) -> dict[str, int]:
        """warning/fatal/panic lines of the maillog, numbers blanked, with their counts (a
        service missing from master.cf or a process limit reached shows up here)."""
        found: Counter[str] = Counter()
        for line in self.maillog.splitlines():
            for word in ("warning:", "fatal:", "panic:"):
                at = line.find(word)
                if at >= 0:
                    found[_NUMBERS.sub("N", line[at:])[:200]] += 1
                    break
        return dict(found)

    def _write_config(self) -> None:
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir / "data", user="postfix")
        tls = None
        if self.cert_file is not None and self.key_file is not None:
            tls = TlsFiles(self.cert_file, self.key_file)
        (self.etc / "main.cf").write_text(
            main_cf(
                variant=self.variant,
                directory=self.dir,
                hostname=self.hostname,
                relayhost=self.relayhost,
                transports=self.transports,
                tls=tls,
                smtputf8=self.smtputf8,
                destination_concurrency=self.destination_concurrency,
                overrides=self.overrides,
            )
        )
        debian = DEBIAN_MASTER_CF.read_text() if DEBIAN_MASTER_CF.exists() else None
        (self.etc / "master.cf").write_text(
            master_cf(self.variant, self.port, tls=tls is not None, debian_text=debian)
        )

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


@dataclass(frozen=True)
class PostfixSettings:
    """How the benchmark configures every Postfix it starts."""

    variant: PostfixVariant = VARIANTS[DEFAULT_VARIANT]
    destination_concurrency: int = SHIPPED_DESTINATION_CONCURRENCY
    overrides: Mapping[str, str] = field(default_factory=dict)


class Postfix:
    """The benchmark's Postfix: a `PrivatePostfix` relaying everything to `next_hop` and
    ``probe.test`` to the latency probe; SMTPUTF8 as its variant says (the load sends none)."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        next_hop: Hop,
        probe: Hop | None,
        settings: PostfixSettings,
        port: int | None = None,
    ):
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
            variant=settings.variant,
            smtputf8=settings.variant.smtputf8,
            destination_concurrency=settings.destination_concurrency,
            overrides=settings.overrides,
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

    def warnings(self) -> dict[str, int]:
        return self.instance.warnings()


# ----------------------------------------------------------------------------- mailrelay


def mailrelay_command() -> list[str]:
    local = REPO / ".venv" / "bin" / "mailrelay"
    if local.exists():
        return [str(local)]
    found = shutil.which("mailrelay")
    return [found] if found else [sys.executable, "-m", "relay"]


Launch = Literal["relay", "up"]


@dataclass(frozen=True)
class MailrelaySettings:
    """How the benchmark runs every mailrelay: the spec's defaults, the per-destination level,
    and what an experiment overrides (`overrides` are dotted MailRelay spec fields)."""

    destination_concurrency: int = SHIPPED_DESTINATION_CONCURRENCY
    overrides: Mapping[str, Any] = field(default_factory=dict)
    launch: Launch = "relay"

    def workers(self) -> int:
        """What the relay's ``workers`` resolves to: an override, else ``auto`` resolved by the
        relay's own rule for a process started from here (same cgroup and affinity mask)."""
        value = self.overrides.get("workers", "auto")
        if value != "auto":
            return int(value)
        from relay.cpus import available_workers

        return available_workers()

    def max_per_destination(self) -> int:
        explicit = self.overrides.get("queue.maxPerDestination")
        if explicit is not None:
            return int(explicit)
        return per_process_destination(self.destination_concurrency, self.workers())


@dataclass
class _Replica:
    relay: str
    name: str
    config_file: Path
    spool_dir: Path
    metrics_port: int
    config_yaml: str
    process: subprocess.Popen[bytes] | None = None


class MailrelaySet:
    """MailRelays planned together from one manifest file by `mailrelay up`'s planner (so a
    ``relay`` next hop resolves to another relay of the set, as in a cluster). As a `System`
    it is measured whole: its port is the first relay's, its pids every relay process."""

    def __init__(self, name: str, workdir: Path, relays: Sequence[RelayDef], settings: MailrelaySettings):
        self.name = name
        self.dir = workdir / name
        self.relays = list(relays)
        self.settings = settings
        self.port = self.relays[0].port
        self.manifest = self.dir / "manifests.yaml"
        self.state = self.dir / "state"
        self.replicas: list[_Replica] = []
        self.up: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after = 0.0

    def render(self) -> list[_Replica]:
        """Write the manifests and plan them with `mailrelay up`'s own code; returns the replica
        processes to run (config files written for launch ``relay``)."""
        from relay_operator.local.layout import StateDir
        from relay_operator.local.plan import LocalOptions, PortBook, Refused, build_plan

        self.dir.mkdir(parents=True, exist_ok=True)
        docs = documents(
            self.relays,
            max_per_destination=self.settings.max_per_destination(),
            spec_overrides=self.settings.overrides,
        )
        self.manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        plan = build_plan([self.manifest], StateDir(self.state), LocalOptions(bind="127.0.0.1"), PortBook())
        if isinstance(plan, Refused):
            raise RuntimeError(f"mailrelay manifests refused: {'; '.join(plan.problems)}")
        self.replicas = []
        for relay in plan.relays:
            for replica in relay.replicas:
                self.replicas.append(
                    _Replica(
                        relay.name,
                        replica.name,
                        replica.config_file,
                        replica.spool_dir,
                        replica.metrics_port,
                        replica.config_yaml,
                    )
                )
                if self.settings.launch == "relay":
                    replica.config_file.parent.mkdir(parents=True, exist_ok=True)
                    replica.config_file.write_text(replica.config_yaml)
                    replica.spool_dir.mkdir(parents=True, exist_ok=True)
        return self.replicas

    def spool_dir(self, relay: str | None = None) -> Path:
        """Replica 0's spool of `relay` (default: the first relay), once rendered."""
        if not self.replicas:
            self.render()
        wanted = relay or self.relays[0].name
        return next(r.spool_dir for r in self.replicas if r.relay == wanted)

    def config_text(self) -> str:
        """The first replica's config as the planner renders it (for the raw results; `up`
        renders the same, with metrics ports of its own choosing)."""
        if not self.replicas:
            self.render()
        return self.replicas[0].config_yaml

    def start(self, wait: bool = True) -> None:
        if not self.replicas:
            self.render()
        self.started_at = time.monotonic()
        if self.settings.launch == "up":
            self._start_up()
        else:
            from relay_operator.local.up import relay_command

            for replica in self.replicas:
                log = (replica.config_file.parent / "relay.log").open("ab")
                replica.process = subprocess.Popen(
                    relay_command(replica.config_file),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    start_new_session=True,
                    env=dict(os.environ, PYTHONUNBUFFERED="1"),
                )
                log.close()
        if wait:
            self.wait_ready()

    def _start_up(self) -> None:
        log = (self.dir / "up.log").open("ab")
        self.up = subprocess.Popen(
            [
                *mailrelay_command(),
                "up",
                "-f",
                str(self.manifest),
                "--state-dir",
                str(self.state),
                "--bind",
                "127.0.0.1",
                "--drain-timeout",
                "20",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )
        log.close()

    def _metrics_port(self, replica: _Replica) -> int | None:
        if self.settings.launch == "relay":
            return replica.metrics_port
        # `up` chose its own metrics ports: read them from the configs it wrote
        try:
            data = yaml.safe_load(replica.config_file.read_text())
            return int(data["metrics"]["port"])
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
            return None

    def _exited(self) -> str | None:
        if self.up is not None and self.up.poll() is not None:
            return f"mailrelay up exited with {self.up.returncode}"
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is not None:
                return f"mailrelay {replica.name} exited with {replica.process.returncode}"
        return None

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Poll every replica's /readyz every 10 ms; seconds from start until all answer 200."""
        deadline = time.monotonic() + timeout
        pending = list(self.replicas)
        while pending and time.monotonic() < deadline:
            exited = self._exited()
            if exited:
                raise RuntimeError(f"{exited}: {self.log_tail()}")
            replica = pending[0]
            port = self._metrics_port(replica)
            if port is not None:
                with (
                    contextlib.suppress(OSError, urllib.error.URLError),
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response,
                ):
                    if response.status == 200:
                        pending.pop(0)
                        continue
            time.sleep(0.01)
        if pending:
            raise TimeoutError(f"mailrelay {self.name} not ready after {timeout:.0f}s: {self.log_tail()}")
        self.ready_after = time.monotonic() - self.started_at
        for relay in self.relays:
            procs.wait_port("127.0.0.1", relay.port)
        return self.ready_after

    def log_tail(self) -> str:
        paths = [self.dir / "up.log"] + [r.config_file.parent / "relay.log" for r in self.replicas]
        return "".join(p.read_text(errors="replace")[-1500:] for p in paths if p.exists())

    def stop(self) -> None:
        """SIGTERM (the relays drain), wait, then SIGKILL by pid for anything left of the tree."""
        if self.up is not None:
            pids = procs.tree([self.up.pid])
            procs.stop_process(self.up, timeout=40)
            procs.kill_tree(pids)
            self.up = None
        for replica in self.replicas:
            if replica.process is None:
                continue
            pids = procs.tree([replica.process.pid])
            procs.stop_process(replica.process, timeout=30)
            procs.kill_tree(pids)
            replica.process = None

    def pids(self) -> list[int]:
        """The relay processes (each replica and its workers), not `up`'s supervisor."""
        if self.up is not None:
            return procs.children(self.up.pid)
        return [r.process.pid for r in self.replicas if r.process is not None]

    def launcher_pids(self) -> list[int]:
        """`mailrelay up`'s supervisor, when it is the launcher (its CPU is reported apart)."""
        return [self.up.pid] if self.up is not None else []

    def queued(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for replica in self.replicas:
            for state in ("incoming", "active", "deferred", "tmp"):
                total[state] = total.get(state, 0) + _count_files(replica.spool_dir / state)
        return total


def one_mailrelay(
    name: str, workdir: Path, next_hop: Hop, probe: Hop | None, settings: MailrelaySettings
) -> MailrelaySet:
    """One MailRelay named `name` relaying to `next_hop` (and ``probe.test`` to `probe`)."""
    return MailrelaySet(name, workdir, [RelayDef(name, procs.free_port(), next_hop, probe)], settings)
