"""The controller of `mailrelay up` (`LocalController`): relay processes on this machine instead
of pods.

Given a `Plan` (relay_operator.local.plan: per relay, per replica a rendered config file and a
metrics port), it starts one process per replica (``python -m relay relay --config FILE``, each
in its own process group and set to receive SIGTERM if `up` dies, via PR_SET_PDEATHSIG; when
it exits, what is left in its group, its workers, is killed, as a pod's processes go with it),
prefixes their output (``[edge-0] ...``), restarts a crashed process with
exponential backoff, polls each process's /readyz and /metrics for the live table, re-plans when
a manifest file changes (route changes: configs rewritten atomically, and each relay, which
watches its file, reloads them without a restart; listener changes: that relay's processes
restart one at a time) and, on SIGINT or SIGTERM, sends SIGTERM to every relay, waits for the drain and kills
stragglers after a timeout. It never exits leaving a child running.

Lowering ``replicas`` drains the removed processes first, as the operator does with pods (issue
14): each gets ``MAILRELAY_POD_NAME`` and a handoff listener of its own, and the removed ones'
configs gain ``drain`` (their names, the remaining processes' handoff ports); the relay then
takes no new mail and hands its queue to the others, `up` polls its GET /queue until it says
``drained`` (or ``scale_down_timeout`` passes), and only then stops it, with an empty spool.
The table shows them as ``+N draining``. Scaling to 0 has no one to hand to: those processes
stop with their queue on disk (and the warning says so). The shared hand-off secret is written
once where a pod mounts it (``secrets/<relay>-handoff/credential``).

It decides nothing about mail: what each relay does comes from the rendered configs; what a
process is comes from the plan. It must not import the relay runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

import aiohttp
import yaml

from relay.config import DrainConfig, HandoffPeer, dump_config, parse_config
from relay_operator.local.layout import StateDir, count_queued, write_atomically, write_secret
from relay_operator.local.plan import LocalRelay, Plan, Refused, ReplicaPlan, handoff_credential
from relay_operator.local.table import (
    MetricsSample,
    ProcessView,
    RelayView,
    build_rows,
    parse_metrics,
    render_table,
)
from relay_operator.spec import ObjectKey

_PR_SET_PDEATHSIG = 1
FAST_POLL = 0.25  # seconds between readiness polls while a process is not ready yet
TABLE_INTERVAL = 2.0  # seconds between table refreshes
WATCH_INTERVAL = 0.5  # seconds between manifest file checks
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a process that ran this long resets its restart backoff
SCALE_DOWN_TIMEOUT = 600.0  # seconds a scaled-away replica may take to hand its queue off


def relay_command(config_file: Path) -> list[str]:
    """How a relay process is started: the same entry point a pod runs."""
    return [sys.executable, "-m", "relay", "relay", "--config", str(config_file)]


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec hook: ask the kernel for SIGTERM when `up` dies (even by SIGKILL),
    and exit at once if it already died between fork and prctl."""

    def hook() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return hook


async def _exited(pid: int) -> None:
    """Return once process `pid` has exited (a pidfd turns readable), whoever reaps it."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _wait_for_pod(process: asyncio.subprocess.Process) -> int:
    """The relay process's exit status. When it exits, whatever it left in its process group
    (relay workers: they hold its output pipe, and `Process.wait` waits for that pipe) is killed,
    as a pod's other processes go with its main process."""
    await _exited(process.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return await process.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def busy_listeners(plan: Plan) -> list[str]:
    """Listener addresses something already holds. A relay binds with SO_REUSEPORT (its
    replicas share the port), so a second `mailrelay up` on the same ports would silently get
    half of the connections; a plain bind finds any holder. Checked once, before starting."""
    busy = []
    for relay in plan.relays:
        if relay.config is None or not relay.replicas:
            continue
        for listener in relay.config.listeners:
            family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((listener.host, listener.port))
                except OSError as exc:
                    busy.append(
                        f"{relay.relay_id} listener {listener.name}: {listener.host}:{listener.port} "
                        f"is not available ({exc.strerror})"
                    )
    return busy


class Console:
    """Owns stdout: prefixed log lines, and the status table (redrawn in place on a terminal,
    printed as ``[status]`` lines when it changed otherwise)."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._table: list[str] = []
        self._shown = 0
        self._last_plain: list[str] = []

    def _erase(self) -> None:
        if self._tty and self._shown:
            self._stream.write(f"\x1b[{self._shown}F\x1b[J")
            self._shown = 0

    def _draw(self) -> None:
        if self._tty and self._table:
            # Cut to the terminal's width: a wrapped line would break the cursor-up redraw.
            width = shutil.get_terminal_size().columns
            self._stream.write("\n".join(line[: max(width - 1, 20)] for line in self._table) + "\n")
            self._shown = len(self._table)

    def line(self, text: str) -> None:
        self._erase()
        self._stream.write(text.rstrip("\n") + "\n")
        self._draw()
        self._stream.flush()

    def lines(self, prefix: str, texts: Sequence[str]) -> None:
        self._erase()
        for text in texts:
            self._stream.write(f"{prefix}{text}\n")
        self._draw()
        self._stream.flush()

    def table(self, lines: list[str]) -> None:
        if self._tty:
            self._erase()
            self._table = lines
            self._draw()
        elif lines != self._last_plain:
            self._last_plain = lines
            for text in lines:
                self._stream.write(f"[status] {text}\n")
        self._stream.flush()


class Replica:
    """One relay process and its restarts: the local stand-in for one pod."""

    def __init__(self, plan: ReplicaPlan, console: Console) -> None:
        self.plan = plan
        self._console = console
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.ready = False
        self.sample: MetricsSample | None = None
        self.draining = False  # scaled away: handing its queue to the remaining replicas
        self.queue: dict[str, object] | None = None  # its last GET /queue answer
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"replica {self.plan.name}")

    async def _spawn(self) -> asyncio.subprocess.Process:
        # the replica's name, as a pod's (relay.app.pod_name: drain.pods, JSON log lines), and
        # its relay's, as the builders give a pod (the relay field of JSON log lines)
        name = self.plan.name
        relay = name.rsplit("-", 1)[0]
        env = dict(os.environ, PYTHONUNBUFFERED="1", MAILRELAY_POD_NAME=name, MAILRELAY_RELAY=relay)
        return await asyncio.create_subprocess_exec(
            *relay_command(self.plan.config_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
            env=env,
        )

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        prefix = f"[{self.plan.name}] "
        while True:
            line = await process.stdout.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            # a JSON line (--log-format json) names its relay and pod itself: kept parseable
            self._console.lines("" if text.startswith("{") else prefix, [text])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN
        while not self._stopping.is_set():
            started = loop.time()
            try:
                process = await self._spawn()
            except OSError as exc:
                self._console.line(f"[up] {self.plan.name}: cannot start: {exc}")
                code = None
            else:
                self.process = process
                pump = asyncio.create_task(self._pump(process))
                code = await _wait_for_pod(process)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pump, timeout=2.0)
                pump.cancel()
            self.ready = False
            self.sample = None
            if self._stopping.is_set():
                break
            if loop.time() - started >= STABLE_AFTER:
                backoff = BACKOFF_MIN
            self.restarts += 1
            why = describe_exit(code) if code is not None else "spawn failed"
            self._console.line(f"[up] {self.plan.name} exited ({why}); restarting in {backoff:g}s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _signal_group(self, signum: int) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signum)

    async def stop(self, timeout: float) -> bool:  # noqa: ASYNC109 (the drain grace period)
        """SIGTERM, wait up to `timeout` for the drain, then SIGKILL. True if it drained."""
        self._stopping.set()
        drained = True
        process = self.process
        if process is not None and process.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=timeout)
            except TimeoutError:
                drained = False
                self._console.line(f"[up] {self.plan.name} did not stop within {timeout:g}s: killing it")
                self._signal_group(signal.SIGKILL)
                await process.wait()
        if self._task is not None:
            # asyncio.wait neither cancels the task if this stop is cancelled nor raises if it was
            await asyncio.wait([self._task])
        self.ready = False
        return drained

    def kill_now(self) -> None:
        self._stopping.set()
        self._signal_group(signal.SIGKILL)

    def view(self) -> ProcessView:
        return ProcessView(
            name=self.plan.name,
            pid=self.pid,
            ready=self.ready,
            metrics_port=self.plan.metrics_port,
            sample=self.sample,
            restarts=self.restarts,
            draining=self.draining,
        )


class RelayGroup:
    """The processes of one MailRelay."""

    def __init__(self, plan: LocalRelay, console: Console) -> None:
        self.plan = plan
        self.replicas: list[Replica] = [Replica(replica, console) for replica in plan.replicas]
        self.draining: dict[Replica, asyncio.Task[None]] = {}  # scaled away, handing off

    def view(self) -> RelayView:
        return RelayView(
            relay=self.plan.relay_id,
            listeners=self.plan.listeners,
            processes=[replica.view() for replica in [*self.replicas, *self.draining]],
            replicas=len(self.plan.replicas),
        )


@dataclass(frozen=True)
class UpOptions:
    state: StateDir
    drain_timeout: float = 30.0
    status_interval: float = TABLE_INTERVAL
    scale_down_timeout: float = SCALE_DOWN_TIMEOUT


Planner = Callable[[], "Plan | Refused"]


class LocalController:
    """Runs a plan until SIGINT/SIGTERM; re-plans when a watched manifest changes."""

    def __init__(self, planner: Planner, first: Plan, options: UpOptions, console: Console) -> None:
        self._planner = planner
        self._plan = first
        self._options = options
        self._console = console
        self._groups: dict[str, RelayGroup] = {}
        self._stop = asyncio.Event()
        self._kill = asyncio.Event()
        self._all_ready = False
        self._http: aiohttp.ClientSession | None = None
        self._changing = asyncio.Lock()
        self._retiring: set[Replica] = set()

    # ------------------------------------------------------------------ files

    def _materialise(self, plan: Plan) -> dict[str, bool]:
        """Write Secrets and configs; per relay, whether any of its config files changed."""
        changed: dict[str, bool] = {}
        for relay in plan.relays:
            for directory, data in relay.secrets.items():
                write_secret(directory, data)
            self._handoff_secret(relay)
            wrote = False
            for replica in relay.replicas:
                replica.spool_dir.mkdir(parents=True, exist_ok=True)
                wrote |= write_atomically(replica.config_file, replica.config_yaml.encode())
            changed[relay.relay_id] = wrote
            self._warn_orphans(relay)
        return changed

    def _handoff_secret(self, relay: LocalRelay) -> None:
        """The relay's shared hand-off secret, made once (what the operator's Secret holds)."""
        path = handoff_credential(self._options.state, _key(relay))
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)
            write_atomically(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)

    def _warn_orphans(self, relay: LocalRelay) -> None:
        state = self._options.state
        group = self._groups.get(relay.relay_id)
        draining = {r.plan.name for r in group.draining} if group is not None else set()
        index = len(relay.replicas)
        while state.replica_dir(relay.namespace, relay.name, index).exists():
            waiting = count_queued(state.spool_dir(relay.namespace, relay.name, index))
            if waiting and f"{relay.name}-{index}" not in draining:
                self._console.line(
                    f"[up] {relay.name}-{index} is beyond replicas={len(relay.replicas)} and its spool "
                    f"still holds {waiting} message(s): raise replicas to deliver them"
                )
            index += 1

    # ------------------------------------------------------------------ processes

    def _start_group(self, relay: LocalRelay) -> None:
        group = RelayGroup(relay, self._console)
        self._groups[relay.relay_id] = group
        for replica in group.replicas:
            replica.start()

    async def _apply(self, plan: Plan) -> None:
        """Bring the running processes in line with a new plan, as the operator would."""
        old = {relay.relay_id: relay for relay in self._plan.relays}
        self._plan = plan
        changed = self._materialise(plan)
        for relay_id in set(old) - {relay.relay_id for relay in plan.relays}:
            removed = self._groups.pop(relay_id)
            self._console.line(f"[up] {relay_id} removed from the manifests: stopping it")
            await asyncio.gather(*(self._retire(r) for r in removed.replicas))
        for relay in plan.relays:
            group = self._groups.get(relay.relay_id)
            if group is None:
                self._console.line(f"[up] {relay.relay_id} added: starting {len(relay.replicas)} process(es)")
                self._start_group(relay)
                continue
            previous = old[relay.relay_id]
            group.plan = relay
            if previous.restart_key != relay.restart_key:
                await self._roll(group, relay)
                continue
            await self._scale(group, relay)
            if changed[relay.relay_id]:
                # Written atomically: each relay notices its file changed and reloads the
                # routes without dropping a connection, as from a ConfigMap in a cluster.
                self._console.line(f"[up] {relay.relay_id}: configuration changed; its processes reload it")

    async def _scale(self, group: RelayGroup, relay: LocalRelay) -> None:
        for replica, plan in zip(group.replicas, relay.replicas, strict=False):
            replica.plan = plan
        removed: list[Replica] = []
        while len(group.replicas) > len(relay.replicas):
            removed.append(group.replicas.pop())
        if removed and not group.replicas:
            for extra in removed:
                self._console.line(
                    f"[up] {relay.relay_id}: scaling to 0, no replica to hand {extra.plan.name}'s queue "
                    "to: stopping it (its queue stays in its spool)"
                )
                await self._retire(extra)
            removed = []
        for extra in removed:
            extra.draining = True
            extra.ready = False
            group.draining[extra] = asyncio.create_task(
                self._drain_then_stop(group, extra), name=f"drain {extra.plan.name}"
            )
        changed = bool(removed)
        for plan in relay.replicas[len(group.replicas) :]:
            back = next((r for r in group.draining if r.plan.name == plan.name), None)
            if back is not None:
                # wanted again before it finished draining: its config (rewritten from the plan,
                # without drain) makes it take mail again; it keeps running
                self._console.line(f"[up] {relay.relay_id}: scaling up, {plan.name} stops draining")
                group.draining.pop(back).cancel()
                back.draining = False
                back.plan = plan
                group.replicas.append(back)
                continue
            for stopping in [r for r in self._retiring if r.plan.name == plan.name]:
                await stopping.stop(self._options.drain_timeout)  # drained and stopping: one per spool
            self._console.line(f"[up] {relay.relay_id}: scaling up, starting {plan.name}")
            replica = Replica(plan, self._console)
            group.replicas.append(replica)
            replica.start()
            changed = True
        if group.draining and changed:
            self._write_drain_configs(group)

    def _write_drain_configs(self, group: RelayGroup) -> None:
        """Each draining replica's config with ``drain``: the draining names, the remaining
        replicas' handoff listeners (what the operator renders into the ConfigMap)."""
        peers = [_handoff_peer(replica.plan) for replica in group.replicas]
        names = sorted(replica.plan.name for replica in group.draining)
        for replica in group.draining:
            config = parse_config(yaml.safe_load(replica.plan.config_yaml))
            draining = config.model_copy(update={"drain": DrainConfig(pods=names, peers=peers)})
            write_atomically(replica.plan.config_file, dump_config(draining).encode())

    async def _drain_then_stop(self, group: RelayGroup, replica: Replica) -> None:
        """Wait until `replica` says it is drained (GET /queue), then stop it."""
        name = replica.plan.name
        remaining = ", ".join(r.plan.name for r in group.replicas)
        self._console.line(f"[up] {group.plan.relay_id}: scaling down, draining {name} to {remaining}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.scale_down_timeout
        report: dict[str, object] | None = None
        while loop.time() < deadline:
            await self._probe_queue(replica)
            report = replica.queue
            if report is not None and report.get("drained") is True:
                break
            await asyncio.sleep(FAST_POLL)
        handed = report.get("handedOff", 0) if report is not None else 0
        if report is not None and report.get("drained") is True:
            self._console.line(f"[up] {name} drained ({handed} message(s) handed off): stopping it")
        else:
            left = report.get("depth", "?") if report is not None else "?"
            self._console.line(
                f"[up] {name} did not drain within {self._options.scale_down_timeout:g}s "
                f"({left} message(s) left): stopping it; its queue stays in its spool"
            )
        self._retiring.add(replica)
        group.draining.pop(replica, None)
        await self._retire(replica)

    async def _roll(self, group: RelayGroup, relay: LocalRelay) -> None:
        """Listener (or other restart-only) changes: replace processes one at a time."""
        self._console.line(f"[up] {relay.relay_id}: listeners changed, restarting its processes")
        old = list(group.replicas)
        group.replicas = []
        for index, plan in enumerate(relay.replicas):
            if index < len(old):
                await self._retire(old[index])
            replica = Replica(plan, self._console)
            group.replicas.append(replica)
            replica.start()
        for stale in old[len(relay.replicas) :]:
            await self._retire(stale)

    async def _retire(self, replica: Replica) -> None:
        """Stop a replica that left the plan; until it has stopped, shutdown still sees it."""
        self._retiring.add(replica)
        await replica.stop(self._options.drain_timeout)
        self._retiring.discard(replica)  # not on cancellation: then shutdown stops it

    def _replicas(self) -> list[Replica]:
        """The processes the plan wants (not the ones draining away)."""
        return [replica for group in self._groups.values() for replica in group.replicas]

    def _processes(self) -> list[Replica]:
        """Every running process: the plan's and those draining away."""
        return [r for group in self._groups.values() for r in [*group.replicas, *group.draining]]

    # ------------------------------------------------------------------ polling

    async def _probe(self, replica: Replica) -> None:
        assert self._http is not None
        if replica.pid is None:
            replica.ready = False
            return
        base = f"http://127.0.0.1:{replica.plan.metrics_port}"
        timeout = aiohttp.ClientTimeout(total=1.5)
        try:
            async with self._http.get(f"{base}/readyz", timeout=timeout) as answer:
                replica.ready = answer.status == 200
            async with self._http.get(f"{base}/metrics", timeout=timeout) as answer:
                if answer.status == 200:
                    replica.sample = parse_metrics(await answer.text())
        except (TimeoutError, aiohttp.ClientError, ValueError):
            replica.ready = False
        if replica.draining:
            await self._probe_queue(replica)

    async def _probe_queue(self, replica: Replica) -> None:
        """The replica's GET /queue answer (None while it does not answer)."""
        assert self._http is not None
        if replica.pid is None:
            replica.queue = None
            return
        url = f"http://127.0.0.1:{replica.plan.metrics_port}/queue"
        try:
            async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=1.5)) as answer:
                replica.queue = await answer.json() if answer.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            replica.queue = None

    def _views(self) -> list[RelayView]:
        return [group.view() for group in self._groups.values()]

    def _write_status(self, views: list[RelayView]) -> None:
        data = {
            "pid": os.getpid(),
            "time": time.time(),
            "ready": self._all_ready,
            "relays": [
                {
                    "relay": view.relay,
                    "replicas": view.replicas,
                    "listeners": [asdict(listener) for listener in view.listeners],
                    "processes": [
                        {
                            "name": p.name,
                            "pid": p.pid,
                            "ready": p.ready,
                            "metricsPort": p.metrics_port,
                            "restarts": p.restarts,
                            "draining": p.draining,
                            "metrics": asdict(p.sample) if p.sample else None,
                        }
                        for p in view.processes
                    ],
                }
                for view in views
            ],
        }
        write_atomically(self._options.state.status_file, (json.dumps(data, indent=1) + "\n").encode())

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_table = 0.0
        while not self._stop.is_set():
            replicas = self._replicas()
            await asyncio.gather(*(self._probe(replica) for replica in self._processes()))
            ready = bool(replicas) and all(replica.ready for replica in replicas)
            views = self._views()
            if ready and not self._all_ready:
                self._console.line(f"[up] ready: {len(replicas)} relay process(es) accept mail")
            self._all_ready = ready
            self._write_status(views)
            now = loop.time()
            if now - last_table >= self._options.status_interval:
                last_table = now
                self._console.table(render_table(build_rows(views)))
            interval = self._options.status_interval if ready else FAST_POLL
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval)

    # ------------------------------------------------------------------ manifests

    @staticmethod
    def _snapshot(paths: Sequence[Path]) -> dict[Path, tuple[int, int]]:
        seen: dict[Path, tuple[int, int]] = {}
        for path in paths:
            with contextlib.suppress(OSError):
                info = path.stat()
                seen[path] = (info.st_mtime_ns, info.st_size)
        return seen

    async def _watch_loop(self) -> None:
        before = self._snapshot(self._plan.watched())
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=WATCH_INTERVAL)
            now = self._snapshot(self._plan.watched())
            if now == before or self._stop.is_set():
                continue
            before = now
            result = self._planner()
            if isinstance(result, Refused):
                self._console.line("[up] the changed manifests are refused; still running the previous ones:")
                for problem in result.problems:
                    self._console.line(f"[up]   {problem}")
                continue
            for warning in result.warnings:
                if warning not in self._plan.warnings:
                    self._console.line(f"[up] {warning}")
            async with self._changing:
                await self._apply(result)
            before = self._snapshot(self._plan.watched())

    # ------------------------------------------------------------------ life cycle

    def _on_signal(self) -> None:
        if self._stop.is_set():
            self._console.line("[up] second interrupt: killing every relay process now")
            self._kill.set()
            for replica in self._processes():
                replica.kill_now()
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)
        self._materialise(self._plan)
        self._http = aiohttp.ClientSession()
        try:
            for relay in self._plan.relays:
                self._start_group(relay)
            tasks = [
                asyncio.create_task(self._poll_loop(), name="poll"),
                asyncio.create_task(self._watch_loop(), name="watch"),
            ]
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and task.exception() is not None:
                    self._console.line(f"[up] internal error: {task.exception()!r}; stopping")
            self._stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self._shutdown()
            await self._http.close()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        return 0

    async def _shutdown(self) -> None:
        async with self._changing:
            for group in self._groups.values():
                for task in group.draining.values():
                    task.cancel()
            replicas = list({*self._processes(), *self._retiring})
            if not replicas:
                return
            self._console.line(
                f"[up] stopping: draining {len(replicas)} relay process(es) "
                f"(up to {self._options.drain_timeout:g}s; Ctrl-C again to kill)"
            )
            results = await asyncio.gather(*(r.stop(self._options.drain_timeout) for r in replicas))
            self._all_ready = False
            with contextlib.suppress(OSError):
                self._write_status(
                    [
                        replace(view, processes=[replace(p, pid=None, ready=False) for p in view.processes])
                        for view in self._views()
                    ]
                )
            killed = results.count(False)
            self._console.line(
                f"[up] stopped: {len(replicas) - killed} drained"
                + (f", {killed} killed after the timeout" if killed else "")
                + "; queued mail stays in the spools for the next `mailrelay up`"
            )


def _key(relay: LocalRelay) -> ObjectKey:
    return ObjectKey(relay.namespace, relay.name)


def _handoff_peer(plan: ReplicaPlan) -> HandoffPeer:
    """Where a replica's handoff listener is (from its rendered config)."""
    handoff = parse_config(yaml.safe_load(plan.config_yaml)).handoff
    host = handoff.host if handoff is not None else "127.0.0.1"
    return HandoffPeer(host="127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port=plan.handoff_port)
