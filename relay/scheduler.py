"""Scheduler (Postfix's qmgr): claims due messages from the spool and delivers them.

Interface used by the process shell (relay.app): ``Scheduler(config, spool, resolver=..., clock=...)``,
``await start()``, ``notify(queue_id)``, ``update_config(config)``, ``await stop(timeout)``, ``stats``.

EARLY INTERFACE COMMIT: the delivery loop is being filled in (helper H2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from relay.config import RelayConfig
from relay.spool import Spool

log = logging.getLogger(__name__)


class Scheduler:
    """Drains one relay's spool; safe to run in several worker processes on one spool."""

    def __init__(
        self,
        config: RelayConfig,
        spool: Spool,
        *,
        resolver: Any = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._config = config
        self._spool = spool
        self._resolver = resolver
        self._clock = clock or time.time
        self._stats = {"delivered": 0, "deferred": 0, "bounced": 0}

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    async def start(self) -> None:
        """Pick up everything already in incoming/ and due in deferred/, then keep rescanning."""

    def notify(self, queue_id: str) -> None:
        """A new message was stored in incoming/: claim and deliver it soon."""

    def update_config(self, config: RelayConfig) -> None:
        """Swap the route table; deliveries in flight finish with the routes they started with."""
        self._config = config

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 (the shell passes its grace period)
        """Stop claiming, let in-flight deliveries finish within `timeout`, leave the rest on disk."""
