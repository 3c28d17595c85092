"""The relay process: the composition root that `mailrelay relay --config FILE` runs (and what
every relay pod runs).

``workers: auto`` (the default) is resolved once at start by relay.cpus (the CPUs this process
may use). One process (``workers: 1``): recover the spool, start the scheduler and the SMTP front, serve
/metrics, /healthz and /readyz, and wait for signals. Several (``workers: N``): the parent
recovers the spool once, then starts N worker processes (spawned, not forked, so no thread or
event-loop state is copied); each binds every listener with SO_REUSEPORT, so the kernel spreads
connections over them, and each runs a front and a scheduler on the shared spool, whose rename
claims keep two workers from delivering the same message. A front that stored a message rings
another worker's doorbell (relay.doorbell), so with one busy session the other worker delivers
while this one keeps reading mail. The parent serves the HTTP endpoints
with prometheus_client's multi-process collector, watches the configuration, forwards reloads,
and restarts a worker that died.

Signals and reloads:
- SIGHUP, or a change of the config file (polled; a ConfigMap's symlink swap counts): load and
  validate; a valid file swaps routes, limits, networks and domains in the front and the
  scheduler without dropping a connection; an invalid one is logged and counted
  (``mailrelay_config_reloads{result="invalid"}``) and the old one stays. Listener, TLS, auth,
  queue directory and worker-count changes need a restart (logged).
- SIGTERM/SIGINT: stop accepting (new sessions get ``421 4.3.2``), let transactions in flight
  finish, stop the scheduler (in-flight deliveries get the rest of the grace period), exit 0.
  The queue stays on disk; the next start recovers it. With several workers the supervisor
  signals every worker and waits until each has stopped taking new sessions before anything
  else (and before it logs "shutting down"), so no new session reaches a worker that has not
  been told yet.
- SIGUSR1 (the pod's preStop hook sends it, then waits for its endpoint to be removed): stop
  taking new sessions (``421 4.3.2``, /readyz 503) but keep running: transactions in flight
  finish and delivery goes on until the SIGTERM that follows. A reload does not undo it.

Scale-down drain (issue 14): the process knows its pod name from ``MAILRELAY_POD_NAME`` (the
operator sets it from the downward API; `mailrelay up` per replica), else the host name. While
the configuration lists it in ``drain.pods`` (at start or after a reload), it drains: /readyz
answers 503 "draining", new sessions get ``421 4.3.2`` (listeners stay bound), transactions in
flight finish, the scheduler keeps delivering, and relay.handoff's `Drainer` hands what is
deferred or held to ``drain.peers`` (one process does it: the single one, or worker 0). A
reload that drops the pod from the list makes it take mail again. ``GET /queue`` reports the
queue and ``drained`` (relay.queue_status); the handoff listener (relay.handoff_server) takes
hand-offs from draining peers when ``handoff`` is configured.

This module wires adapters together and handles signals; it decides nothing about mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from relay import logs, metrics, throttle
from relay.abuse import AbuseStore
from relay.config import ConfigError, HandoffConfig, RelayConfig, load_config
from relay.config_watch import ConfigWatcher
from relay.core.model import QueueEntry
from relay.core.settle import Settlement
from relay.cpus import worker_count
from relay.dkim import check_keys
from relay.doorbell import Doorbell
from relay.events import Outbox
from relay.front import Front
from relay.handoff import Drainer, HandoffClient, Timeouts
from relay.health import HealthServer, metrics_registry, spool_writable
from relay.http_api import HttpApi
from relay.logs import LogFormat
from relay.message_status import StatusBook
from relay.open_relay import SelfCheck, relay_safe_gauge
from relay.queue_status import metrics_text, queue_status
from relay.scheduler import Scheduler
from relay.spool import Spool

log = logging.getLogger(__name__)

DEFAULT_GRACE = 25.0  # Kubernetes' default terminationGracePeriodSeconds is 30
_RESTART_FIELDS = ("listeners", "tls", "auth", "api", "workers", "metrics", "handoff")
DRAIN_ACK_TIMEOUT = 10.0  # seconds the supervisor waits for every worker to stop taking sessions


def pod_name() -> str:
    """This relay's pod name: ``MAILRELAY_POD_NAME`` (downward API, or `mailrelay up`), else
    ``POD_NAME``, else the host name (a StatefulSet pod's host name is
    its name)."""
    return os.environ.get("MAILRELAY_POD_NAME") or os.environ.get("POD_NAME") or socket.gethostname()


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop when it is installed, else on asyncio's default loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


_logging: dict[str, Any] = {"log_format": None, "worker": None}  # this process's, for reloads


def configure_logging(
    config: RelayConfig, worker: int | None = None, log_format: LogFormat | None = None
) -> None:
    """The process's log lines: `log_format` (the command line's) wins over the config's."""
    _logging.update(log_format=log_format, worker=worker)
    logs.configure(
        log_format or config.log_format,
        config.log_level,
        relay=config.hostname,
        pod=pod_name(),
        worker=worker,
    )


def restart_needed(old: RelayConfig, new: RelayConfig) -> list[str]:
    """Top-level fields whose change a reload cannot apply."""
    changed = [name for name in _RESTART_FIELDS if getattr(old, name) != getattr(new, name)]
    if old.queue.directory != new.queue.directory:
        changed.append("queue.directory")
    return changed


def reload_config(path: Path, running: RelayConfig, *, count: bool) -> RelayConfig | None:
    """The one reload step of every process: load and validate `path`, log what only a restart
    applies, count the result (when `count`); None keeps the running configuration."""
    try:
        new = load_config(path)
        check_keys(new)
    except ConfigError as exc:
        log.error("config reload: invalid file, keeping the running configuration:\n%s", exc)
        if count:
            metrics.CONFIG_RELOADS.labels(result="invalid").inc()
        return None
    for name in restart_needed(running, new):
        log.warning("config reload: a change of %s takes effect after a restart", name)
    if count:
        metrics.CONFIG_RELOADS.labels(result="ok").inc()
    return new


class RelayProcess:
    """One relay process: front + scheduler on one spool, plus (optionally) the HTTP endpoints
    and the config watcher."""

    def __init__(
        self,
        config_path: Path,
        config: RelayConfig,
        *,
        recover: bool = True,
        serve_health: bool = True,
        watch: bool = True,
        count_reloads: bool = True,
        grace: float = DEFAULT_GRACE,
        on_ready: Callable[[], None] | None = None,
        watch_interval: float = 1.0,
        doorbell: Doorbell | None = None,
        hands_off: bool = True,
        on_stopping: Callable[[], None] | None = None,
        pod: str | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.config = config
        self.recover = recover
        self.serve_health = serve_health
        self.watch = watch
        self.count_reloads = count_reloads
        self.grace = grace
        self.on_ready = on_ready
        self.watch_interval = watch_interval
        self.doorbell = doorbell
        self.hands_off = hands_off  # this process runs the drainer (one per relay process group)
        self.on_stopping = on_stopping
        self.pod = pod or pod_name()
        self.quiesced = False  # SIGUSR1: no new sessions until the SIGTERM that follows
        self.drainer: Drainer | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.front: Front | None = None
        self.self_check: SelfCheck | None = None
        self.scheduler: Scheduler | None = None
        self.spool: Spool | None = None
        self.api: HttpApi | None = None
        self.outbox: Outbox | None = None
        self._stop: asyncio.Event | None = None

    # ------------------------------------------------------------------ reload

    def reload(self) -> None:
        """Load, validate and apply the config file; keep the old one if the new is invalid."""
        new = reload_config(self.config_path, self.config, count=self.count_reloads)
        if new is None:
            return
        self.config = new
        if self.front is not None:
            self.front.update_config(new)
        if self.scheduler is not None:
            self.scheduler.update_config(new)
        configure_logging_level(new)
        log.info("config reloaded: %d routes", len(new.routes))
        self._apply_drain()

    # ------------------------------------------------------------------ scale-down drain

    @property
    def draining(self) -> bool:
        """Whether the configuration asks this pod to drain."""
        return self.config.draining(self.pod)

    def _apply_drain(self) -> None:
        """Start or stop the scale-down drain to match the configuration."""
        front = self.front
        if front is None or self._stop is None or self._stop.is_set():
            return
        if self.draining:
            if not front.draining:
                log.info(
                    "draining (pod %s is in drain.pods): no new mail, queued mail goes to peers", self.pod
                )
                front.begin_drain()
            if self.hands_off and self._drain_task is None and self.spool is not None:
                self._start_drainer(self.spool)
        elif front.draining and not self.quiesced:
            log.info("drain ended (pod %s left drain.pods): taking mail again", self.pod)
            front.end_drain()
            self._stop_drainer()

    def _start_drainer(self, spool: Spool) -> None:
        config = self.config
        credential = (config.handoff or HandoffConfig()).credential_file
        queue = config.queue
        client = HandoffClient(
            config.hostname,
            credential,
            Timeouts(queue.connect_timeout, queue.command_timeout, queue.data_timeout),
        )

        def peers() -> list[Any]:
            drain = self.config.drain
            return list(drain.peers) if drain is not None else []

        drainer = self.drainer = Drainer(spool, peers, client)
        self._drain_task = asyncio.get_running_loop().create_task(drainer.run(), name="handoff")

    def _stop_drainer(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None

    def queue_report(self) -> dict[str, Any]:
        """The GET /queue document (blocking: lists the spool)."""
        spool = self.spool
        assert spool is not None
        front = self.front
        return queue_status(
            spool.snapshot(),
            pod=self.pod,
            draining=self.draining,
            busy=front is not None and front.busy,
            handed_off=self.drainer.stats.handed_off if self.drainer is not None else 0,
            now=time.time(),
            relay_safe=self.self_check.last if self.self_check is not None else None,
        )

    def queue_metrics(self) -> str:
        assert self.spool is not None
        return metrics_text(self.spool.snapshot(), time.time())

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def quiesce(self) -> None:
        """SIGUSR1: take no new session from now on, keep delivering (see the module docstring)."""
        self.quiesced = True
        if self.front is not None and not self.front.draining:
            log.info("stopping (preStop): no new sessions; transactions in flight and deliveries go on")
            self.front.begin_drain()

    # ------------------------------------------------------------------ run

    def ready(self) -> tuple[bool, str]:
        if self.front is not None and self.front.draining and self.draining:
            return False, "draining"
        if self.front is None or self.front.draining:
            return False, "not accepting mail"
        if not all(rt.server is not None and rt.server.is_serving() for rt in self.front.listeners.values()):
            return False, "listeners not bound"
        if self.api is not None and not self.api.serving():
            return False, "http listeners not bound"
        if not spool_writable(self.config.queue.directory):
            return False, "spool not writable"
        return True, "ready"

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = self.config
        spool = self.spool = Spool(config.queue.directory)
        try:
            if self.recover:
                report = await asyncio.to_thread(spool.recover)
                log.info("spool %s recovered: %s", config.queue.directory, report)
            else:
                await asyncio.to_thread(spool.prepare)
        except OSError as exc:
            log.error("cannot use the queue directory %s: %s", config.queue.directory, exc)
            spool.close()
            return 1
        http_listeners = [lc for lc in config.listeners if lc.mode == "http"]
        book = StatusBook(config.queue.directory) if http_listeners else None
        outbox = self.outbox = Outbox(config.queue.directory, lambda: self.config)
        hooks = [hook for hook in (book.on_settled if book else None, outbox.on_settled) if hook is not None]

        async def settled(entry: QueueEntry, settlement: Settlement) -> None:
            for hook in hooks:  # status records, then delivery events (relay.events)
                await hook(entry, settlement)

        scheduler = self.scheduler = Scheduler(config, spool, on_settled=settled)
        doorbell = self.doorbell

        def stored(queue_id: str) -> None:
            if doorbell is None or not doorbell.ring(queue_id):
                scheduler.notify(queue_id)

        abuse = AbuseStore(spool.directory)
        if self.recover:  # the relay's first process: no connection is open yet
            abuse.reset_live()
        front = self.front = Front(
            config, spool, on_stored=stored, intake_gate=scheduler.room_for_intake, abuse=abuse
        )
        try:
            await front.start()
        except OSError as exc:
            log.error("cannot bind a listener: %s", exc)
            await front.close()
            spool.close()
            return 1
        if book is not None:
            self.api = HttpApi(front, http_listeners, book, pod=self.pod)
            try:
                await self.api.start()
            except OSError as exc:
                log.error("cannot bind an http listener: %s", exc)
                await self.api.close()
                await front.close()
                spool.close()
                return 1
        await scheduler.start()
        self_check = self.self_check = SelfCheck(config, front.addresses)
        if self.serve_health:  # a worker leaves the self-check (and its gauge) to its supervisor
            relay_safe_gauge().set(-1)  # "not tested" until a check ran (0 would mean open)
            if config.self_check.interval > 0:
                self_check.start(config.self_check.interval, config.self_check.first_after)
        outbox.start()
        if doorbell is not None:
            doorbell.listen(scheduler.notify)
        health: HealthServer | None = None
        if self.serve_health:
            health = HealthServer(
                config.metrics.host,
                config.metrics.port,
                self.ready,
                queue=self.queue_report,
                extra_metrics=self.queue_metrics,
            )
            try:
                await health.start()
            except OSError as exc:
                log.error(
                    "cannot bind the metrics port %s:%d: %s", config.metrics.host, config.metrics.port, exc
                )
                health = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.quiesce)
        watcher: ConfigWatcher | None = None
        if self.watch:
            watcher = ConfigWatcher(self.config_path, self.reload, interval=self.watch_interval)
            watcher.start()
        addresses = {**front.addresses, **(self.api.addresses if self.api is not None else {})}
        listeners = ", ".join(f"{n} {h}:{p}" for n, (h, p) in addresses.items())
        if front.handoff is not None:
            listeners += ", handoff {}:{}".format(*front.handoff.address)
        log.info("relay %s ready (pid %d): %s", config.hostname, os.getpid(), listeners)
        self._apply_drain()
        if self.on_ready is not None:
            self.on_ready()
        await self._stop.wait()

        # Before anything else: no new session from now on (the supervisor waits for this).
        front.begin_drain()
        if self.on_stopping is not None:
            self.on_stopping()
        self._stop_drainer()
        deadline = loop.time() + self.grace
        log.info("shutting down: finishing transactions and deliveries (grace %.0fs)", self.grace)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(signum)
        if watcher is not None:
            await watcher.stop()
        if doorbell is not None:
            doorbell.close()  # mail stored from now on is delivered here or by the others' rescan
        await self_check.stop()
        await front.drain(self.grace * 0.6)  # the HTTP API answers 503 from its start
        if self.api is not None:
            await self.api.close()
        await scheduler.stop(max(deadline - loop.time(), 0.5))
        await outbox.stop()  # unsent events stay in the outbox for the next start
        if health is not None:
            await health.stop()
        spool.close()
        log.info("stopped; the queue stays in %s", config.queue.directory)
        return 0


def configure_logging_level(config: RelayConfig) -> None:
    """A reload: the new config's level and format (the command line's format still wins)."""
    configure_logging(config, worker=_logging["worker"], log_format=_logging["log_format"])


# ----------------------------------------------------------------------------- several workers


def _die_with_parent() -> None:
    """A worker must not outlive its supervisor: killed with SIGKILL, the supervisor cannot stop
    its workers, and orphans would keep serving the port and claiming the spool while a new
    relay recovers it. Linux delivers SIGKILL to this process when the parent dies (prctl
    PR_SET_PDEATHSIG); a parent that died before the call is caught by the ppid check."""
    import ctypes

    parent = multiprocessing.parent_process()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def worker_main(
    config_path: str,
    index: int,
    ready: multiprocessing.synchronize.Event,
    grace: float,
    doorbells: list[tuple[Connection, Connection]],
    stopping: multiprocessing.synchronize.Event,
    log_format: LogFormat | None = None,
) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent()
    doorbell = Doorbell(
        os.dup(doorbells[index][0].fileno()),
        [os.dup(writer.fileno()) for n, (_reader, writer) in enumerate(doorbells) if n != index],
    )
    for reader, writer in doorbells:
        reader.close()
        writer.close()
    try:
        config = load_config(Path(config_path))
    except ConfigError as exc:
        logging.basicConfig()
        logging.getLogger(__name__).error("worker %d: invalid configuration:\n%s", index, exc)
        raise SystemExit(2) from exc
    configure_logging(config, worker=index, log_format=log_format)
    process = RelayProcess(
        Path(config_path),
        config,
        recover=False,
        serve_health=False,
        watch=False,
        count_reloads=False,
        grace=grace,
        on_ready=ready.set,
        doorbell=doorbell,
        hands_off=index == 0,
        on_stopping=stopping.set,
    )
    raise SystemExit(run_event_loop(process.run()))


class Supervisor:
    """The parent of N worker processes (``workers`` > 1)."""

    def __init__(
        self,
        config_path: Path,
        config: RelayConfig,
        *,
        workers: int,
        grace: float = DEFAULT_GRACE,
        log_format: LogFormat | None = None,
    ) -> None:
        self.log_format = log_format
        self.config_path = Path(config_path)
        self.config = config
        self.workers = workers
        self.grace = grace
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[
            tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]
        ] = []
        self._stopping_events: list[multiprocessing.synchronize.Event] = []
        self.pod = pod_name()
        self._spool = Spool(config.queue.directory)
        self._registry: Any = None
        self._self_check: SelfCheck | None = None
        self._stopping = False
        self._quiesced = False  # SIGUSR1 (preStop): every worker takes no new session
        self._stop: asyncio.Event | None = None
        # one pipe per worker, kept open here so a restarted worker reads what its predecessor left
        self._doorbells = [self._context.Pipe(duplex=False) for _ in range(workers)]

    def _spawn(
        self, index: int
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]:
        ready = self._context.Event()
        stopping = self._context.Event()
        if index < len(self._stopping_events):
            self._stopping_events[index] = stopping
        else:
            self._stopping_events.append(stopping)
        process = self._context.Process(
            target=worker_main,
            args=(
                str(self.config_path),
                index,
                ready,
                self.grace,
                self._doorbells,
                stopping,
                self.log_format,
            ),
            name=f"mailrelay-worker-{index}",
        )
        process.start()
        log.info("worker %d started (pid %s)", index, process.pid)
        return process, ready

    @property
    def draining(self) -> bool:
        return self.config.draining(self.pod)

    def _sample_sum(self, name: str, **labels: str) -> float:
        """The sum of one series over every worker (from the multi-process registry)."""
        total = 0.0
        if self._registry is None:
            return total
        for family in self._registry.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def queue_report(self) -> dict[str, Any]:
        return queue_status(
            self._spool.snapshot(),
            pod=self.pod,
            draining=self.draining,
            busy=self._sample_sum("mailrelay_smtp_sessions") > 0,
            handed_off=int(self._sample_sum("mailrelay_handoff_messages_total", result="sent")),
            now=time.time(),
            relay_safe=self._relay_safe(),
        )

    def _relay_safe(self) -> bool | None:
        """The supervisor's open-relay self-check (it runs it for the whole relay)."""
        return self._self_check.last if self._self_check is not None else None

    def queue_metrics(self) -> str:
        return metrics_text(self._spool.snapshot(), time.time())

    def ready(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        if self._quiesced:
            return False, "not accepting mail"
        if self.draining:
            return False, "draining"
        for index, (process, ready) in enumerate(self._workers):
            if not process.is_alive() or not ready.is_set():
                return False, f"worker {index} not ready"
        if not spool_writable(self.config.queue.directory):
            return False, "spool not writable"
        return True, "ready"

    def reload(self) -> None:
        """Validate here, then let every worker reload itself (SIGHUP)."""
        new = reload_config(self.config_path, self.config, count=True)
        if new is None:
            return
        self.config = new
        configure_logging_level(new)
        for process, _ready in self._workers:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)
        log.info("config reloaded: %d routes, forwarded to %d workers", len(new.routes), len(self._workers))

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _monitor(self) -> None:
        from prometheus_client import multiprocess

        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, (process, _ready) in enumerate(self._workers):
                if self._stopping or process.is_alive():
                    continue
                log.error(
                    "worker %d (pid %s) exited with %s; restarting", index, process.pid, process.exitcode
                )
                if process.pid is not None:
                    with contextlib.suppress(Exception):
                        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                await asyncio.sleep(1.0)
                if not self._stopping:
                    self._workers[index] = self._spawn(index)
                    if self._quiesced:  # a worker started after the preStop takes no session either
                        asyncio.get_running_loop().create_task(self._quiesce_when_ready(index))

    def quiesce(self) -> None:
        """SIGUSR1 (preStop): every worker stops taking sessions and goes on delivering."""
        self._quiesced = True
        log.info("stopping (preStop): no worker takes new sessions; deliveries go on")
        for index in range(len(self._workers)):
            asyncio.get_running_loop().create_task(self._quiesce_when_ready(index))

    async def _quiesce_when_ready(self, index: int) -> None:
        """SIGUSR1 to worker `index` once its handler is installed (before, it would end it)."""
        process, ready = self._workers[index]
        while process.is_alive() and not ready.is_set() and not self._stopping:
            await asyncio.to_thread(ready.wait, 0.2)
        if ready.is_set() and process.pid is not None and process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR1)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._workers = [self._spawn(i) for i in range(self.workers)]
        registry = self._registry = metrics_registry()
        # The parent's own counter (reloads) lives in its memory, not in the workers' files.
        registry.register(metrics.CONFIG_RELOADS)
        health = HealthServer(
            self.config.metrics.host,
            self.config.metrics.port,
            self.ready,
            registry,
            queue=self.queue_report,
            extra_metrics=self.queue_metrics,
        )
        try:
            await health.start()
        except OSError as exc:
            log.error("cannot bind the metrics port: %s", exc)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.quiesce)
        watcher = ConfigWatcher(self.config_path, self.reload)
        watcher.start()
        monitor = asyncio.create_task(self._monitor())
        relay_safe_gauge(registry).set(-1)  # "not tested" until a check ran (0 would mean open)
        if self.config.self_check.interval > 0:  # once for the relay, not once per worker
            addresses = {lc.name: (lc.host, lc.port) for lc in self.config.listeners}
            self._self_check = SelfCheck(self.config, addresses, registry)
            self._self_check.start(self.config.self_check.interval, self.config.self_check.first_after)
        await self._stop.wait()
        self._stopping = True
        if self._self_check is not None:
            await self._self_check.stop()
        # Every worker first: each stops taking sessions, and only once all have said so is
        # anything else done (a new session must not reach a worker not yet signalled).
        for process, _ready in self._workers:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        await self._all_stopping(DRAIN_ACK_TIMEOUT)
        monitor.cancel()
        await watcher.stop()
        log.info("shutting down %d workers: none takes new sessions", len(self._workers))
        for process, _ready in self._workers:
            await asyncio.to_thread(process.join, self.grace + 5)
            if process.is_alive():
                log.error("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.join, 5)
        await health.stop()
        self._spool.close()
        return 0

    async def _all_stopping(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until every live worker reported that it takes no new session (or `timeout`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for (process, _ready), stopping in zip(self._workers, self._stopping_events, strict=True):
            while process.is_alive() and not stopping.is_set() and loop.time() < deadline:
                await asyncio.to_thread(stopping.wait, 0.2)


# ----------------------------------------------------------------------------- entry point


def run_relay(
    config_path: Path,
    config: RelayConfig,
    *,
    grace: float = DEFAULT_GRACE,
    log_format: LogFormat | None = None,
) -> int:
    """Run the relay described by `config` (already loaded from `config_path`) until SIGTERM;
    `log_format` (``--log-format``) overrides the config's ``log_format`` in every process."""
    configure_logging(config, log_format=log_format)
    workers = worker_count(config)
    if config.workers == "auto":
        log.info("workers: auto = %d (the CPUs this process may use)", workers)
    if workers == 1:
        return run_event_loop(RelayProcess(config_path, config, grace=grace).run())
    made_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made_dir = tempfile.mkdtemp(prefix="mailrelay-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made_dir
    else:
        for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
            stale.unlink(missing_ok=True)
    # The rate budgets every worker shares (relay.throttle): a file in a private directory.
    throttle_dir = tempfile.mkdtemp(prefix="mailrelay-throttle-")
    os.environ[throttle.ENV_FILE] = str(Path(throttle_dir) / "buckets")
    os.environ[throttle.ENV_WORKERS] = str(workers)
    try:
        spool = Spool(config.queue.directory)
        try:
            log.info("spool %s recovered: %s", config.queue.directory, spool.recover())
            store = AbuseStore(spool.directory)  # shared by the workers: none serves yet
            store.reset_live()
            store.close()
        finally:
            spool.close()
        return run_event_loop(
            Supervisor(config_path, config, workers=workers, grace=grace, log_format=log_format).run()
        )
    finally:
        if made_dir is not None:
            shutil.rmtree(made_dir, ignore_errors=True)
        shutil.rmtree(throttle_dir, ignore_errors=True)
