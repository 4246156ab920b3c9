"""One Redis pub/sub subscription per process, fanned out to this process's streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from shared.bus import BusEvent, decode_event
from shared.metrics import Metrics
from shared.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

Listener = Callable[[BusEvent], None]
IDLE_READ_S = 1.0


class Hub:
    """Reads the bus and calls every registered listener for each event, in order.

    A listener must not block: it encodes and queues; writing happens elsewhere."""

    def __init__(self, redis: aioredis.Redis, channel: str, metrics: Metrics) -> None:
        self.redis = redis
        self.channel = channel
        self.metrics = metrics
        self.listeners: list[Listener] = []
        # Called each time the subscription is (re)made: events published while it was
        # down are gone, and the feeds reconcile from PostgreSQL at once.
        self.on_subscribed: list[Callable[[], None]] = []
        # Called once when the subscription is lost (events may be lost from then on).
        self.on_lost: list[Callable[[], None]] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-bus-listener")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        delay = 0.1
        lost = False
        me = asyncio.current_task()
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                if delay > 0.1 or lost:
                    logger.info("bus subscription is back")
                lost = False
                for callback in self.on_subscribed:
                    callback()
                delay = 0.1
                while True:
                    # A bounded read: an idle bus is "nothing yet", not a lost
                    # connection (the client's socket_timeout would say so to listen()).
                    raw = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=IDLE_READ_S
                    )
                    if raw is not None:
                        self.dispatch(raw.get("data"))
                    elif me is not None and me.cancelling():
                        # redis-py turns its read timeout into "no message" even when
                        # our stop's cancel came at the same moment (a loop that was
                        # not running, as between a test's set-up and teardown): honour it.
                        raise asyncio.CancelledError
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                if not lost:
                    # One line per outage, not one per attempt.
                    logger.warning(
                        "bus subscription lost (%s); reconnecting", exc.__class__.__name__
                    )
                    lost = True
                    for callback in self.on_lost:
                        callback()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def dispatch(self, data: Any) -> None:
        """The one decoder at the bus's edge: typed from here on."""
        event = decode_event(data)
        if event is None:
            logger.warning("ignoring malformed bus event")
            return
        self.metrics.events_received.labels(type(event).__name__).inc()
        with self.metrics.fanout_seconds.time():
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:
                    logger.exception("bus listener failed")
