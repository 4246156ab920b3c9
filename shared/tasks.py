"""Background tasks' one stop rule."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` and wait until they have ended. ``asyncio.wait`` never raises
    what the tasks raised, so the caller's own cancellation is not swallowed (as
    ``suppress(CancelledError)`` around an ``await task`` would); a task that failed
    is logged, not lost."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    if not live:
        return
    await asyncio.wait(live)
    for task in live:
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %s failed", task.get_name(), exc_info=task.exception())
