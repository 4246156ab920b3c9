"""The event loop the daemons run on: asyncio's standard loop, or uvloop with
``HERALD_UVLOOP=1`` where it is installed.

uvloop (libuv under asyncio's API) measured 10-15 % lower fan-out time at 10,000 streams
and 5-10 % less CPU per delivery than the standard selector loop, for about 0.4 KB more
per stream (docs/performance.md). It is off by default because aiopg misbehaves on it
once PostgreSQL stops answering: after a statement timeout closes a connection, a new
connection that reuses the descriptor meets uvloop's closed poll handle and the request
fails with a RuntimeError (500) instead of a 503. Only ``herald serve`` and ``herald
worker`` use this; one-shot commands and the tests keep asyncio's default loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from shared.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(settings: Settings) -> LoopFactory | None:
    """uvloop's loop constructor, or None for asyncio's default (off, or not installed)."""
    if not settings.uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        logger.info("uvloop is not installed: running the standard asyncio loop")
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop`` or ``asyncio`` for the running (or given) loop, for /health and logs."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
