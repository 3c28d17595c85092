"""Stopping a background task: cancel it and wait until it has ended.

Shared by the adapters that run one task of their own (`config_watch`, `events`, `submit`).
Decides nothing and does no I/O; an exception the task raised other than the cancellation
propagates to the caller as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (nothing when None) and wait for it to end."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
