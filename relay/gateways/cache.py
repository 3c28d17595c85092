"""The gateway transports of one scheduler: built on first use, kept, closed when unused.

relay.hops asks `GatewayCache.get` for the transport of a `GatewayHop` (built by
`relay.gateways.build_gateway` the first time, then reused: a webhook keeps its HTTP session)
and the semaphore that limits its concurrent deliveries to ``queue.maxPerDestination`` (the
limit in force when the gateway was first used). After a route reload `retain` closes, in the
background, the transports no route uses any more; `close` closes them all at shutdown.

Decides nothing about delivery; a transport that cannot be built raises to the caller.
"""

from __future__ import annotations

import asyncio
import logging

from relay.config import GatewayHop, RelayConfig
from relay.core import routing
from relay.core.model import Transport
from relay.gateways import build_gateway

log = logging.getLogger(__name__)


def gateway_key(hop: GatewayHop) -> str:
    """Hops with the same settings share one transport."""
    return hop.model_dump_json()


class GatewayCache:
    """Transports and their concurrency limits, by gateway settings."""

    def __init__(self) -> None:
        self._transports: dict[str, Transport] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._background: set[asyncio.Task[None]] = set()

    def get(self, hop: GatewayHop, config: RelayConfig) -> tuple[Transport, asyncio.Semaphore]:
        """The transport for `hop` and its limit; raises what building it raised."""
        key = gateway_key(hop)
        transport = self._transports.get(key)
        if transport is None:
            transport = self._transports[key] = build_gateway(hop, config)
        limit = self._limits.setdefault(key, asyncio.Semaphore(config.queue.max_per_destination))
        return transport, limit

    def retain(self, config: RelayConfig) -> None:
        """Close (in the background) every transport no route of `config` uses."""
        wanted = {
            gateway_key(hop)
            for route in config.routes
            for hop in routing.route_hops(route)
            if isinstance(hop, GatewayHop)
        }
        for key in [k for k in self._transports if k not in wanted]:
            transport = self._transports.pop(key)
            self._limits.pop(key, None)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no running loop (a synchronous caller): nothing to await on
                continue
            task = loop.create_task(transport.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(_log_task_error)

    async def close(self) -> None:
        for transport in list(self._transports.values()):
            try:
                await transport.close()
            except Exception:
                log.exception("closing a gateway failed")
        self._transports.clear()


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed: %s", task.exception())
