"""Background tasks' one stop rule."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)

RECANCEL_S = 1.0


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` and wait until they have ended. ``asyncio.wait`` never raises
    what the tasks raised, so the caller's own cancellation is not swallowed (as
    ``suppress(CancelledError)`` around an ``await task`` would); a task that failed
    is logged, not lost."""
    live = [t for t in tasks if t is not None]
    if not live:
        return
    pending = set(live)
    while pending:
        for task in pending:
            task.cancel()
        # A cancel can be lost inside a library (Python 3.11's timeout context managers
        # turn a cancel that meets their own deadline into TimeoutError; redis-py turns a
        # read timeout into "no message"): a task still running a second later gets
        # another one rather than hanging its owner's shutdown.
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for task in live:
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %s failed", task.get_name(), exc_info=task.exception())
