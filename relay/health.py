"""The relay's HTTP side door: Prometheus ``/metrics``, ``/healthz`` (the process is alive and
its event loop answers), ``/readyz`` (listeners bound and the spool writable; 503 "draining"
while the pod drains) and ``GET /queue`` (the queue as JSON, relay.queue_status), on the
``metrics`` host and port of the configuration.

With several worker processes the parent serves this endpoint and reads every worker's metric
files through prometheus_client's multi-process collector (``PROMETHEUS_MULTIPROC_DIR``).

Called by relay.app; decides nothing about mail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], tuple[bool, str]]
QueueReport = Callable[[], dict[str, Any]]  # blocking (lists the spool): run in a thread
ExtraMetrics = Callable[[], str]  # more Prometheus text, computed at scrape time (blocking)


def spool_writable(directory: Path) -> bool:
    """Whether a file can be created and removed in the spool's tmp/ directory (blocking)."""
    probe = Path(directory) / "tmp" / f".ready-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def metrics_registry() -> CollectorRegistry:
    """The default registry, or a multi-process one when PROMETHEUS_MULTIPROC_DIR is set."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


class HealthServer:
    """aiohttp server for /metrics, /healthz and /readyz."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: ReadyCheck,
        registry: CollectorRegistry | None = None,
        *,
        queue: QueueReport | None = None,
        extra_metrics: ExtraMetrics | None = None,
    ):
        self.host = host
        self.port = port
        self.ready = ready
        self.queue = queue
        self.extra_metrics = extra_metrics
        self.registry = registry or metrics_registry()
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] = (host, port)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/queue", self._queue)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server private; the bound port is needed
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.address = sockets[0].getsockname()[:2]
        log.info("metrics and health on http://%s:%d/", *self.address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _exposition(self) -> bytes:
        body = generate_latest(self.registry)
        if self.extra_metrics is not None:
            body += self.extra_metrics().encode("utf-8")
        return body

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _queue(self, _request: web.Request) -> web.Response:
        if self.queue is None:
            return web.Response(status=404, text="no queue here\n")
        report = await asyncio.to_thread(self.queue)
        return web.Response(text=json.dumps(report) + "\n", content_type="application/json")

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok, reason = await asyncio.to_thread(self.ready)
        return web.Response(
            status=200 if ok else 503, text=("ready" if ok else f"not ready: {reason}") + "\n"
        )
