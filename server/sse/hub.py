"""One Redis pub/sub subscription per process, fanned out to this process's streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from shared.metrics import Metrics

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]


class Hub:
    """Reads the bus and calls every registered listener for each event, in order.

    A listener must not block: it encodes and queues; writing happens elsewhere."""

    def __init__(self, redis: aioredis.Redis, channel: str, metrics: Metrics) -> None:
        self.redis = redis
        self.channel = channel
        self.metrics = metrics
        self.listeners: list[Listener] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-bus-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                delay = 0.1
                async for raw in pubsub.listen():
                    self.dispatch(raw.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception:
                self.subscribed.clear()
                logger.warning("bus subscription lost; retrying in %.1fs", delay, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def dispatch(self, data: Any) -> None:
        try:
            event = json.loads(data)
        except (TypeError, ValueError):
            logger.warning("ignoring malformed bus event")
            return
        if not isinstance(event, dict):
            return
        self.metrics.events_received.labels(str(event.get("type"))).inc()
        with self.metrics.fanout_seconds.time():
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:
                    logger.exception("bus listener failed")
