"""The feeds' task stops when it is cancelled, whatever it is doing: a cancel that lands
while a reconcile query completes must not be lost (aiopg waits with asyncio.wait_for,
which on Python 3.11 can return the result and drop the cancel), or the server's
cleanup, and so its SIGTERM exit, waits forever."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from shared.bus import EventBus
from shared.metrics import Metrics
from shared.services.messages import MessageService, Posted
from tests.helpers import make_channel


class Collected:
    """A real sink: what the feeds wrote, per channel."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []

    def emit(self, channel_id: int, batch: Sequence[Posted]) -> None:
        self.batches.append((channel_id, [p.id for p in batch]))

    def reset_channel(self, channel_id: int, last_id: int) -> None:
        raise AssertionError("no reset expected")


async def test_feeds_stop_whenever_cancelled(client, alice, app_db, redis, settings):
    from server.sse.feeds import Feeds

    channels = [await make_channel(client, alice, f"c{i}") for i in range(5)]
    messages = MessageService(db=app_db, bus=EventBus(redis, settings), metrics=Metrics.null())
    rng = random.Random(3)
    for _ in range(60):
        feeds = Feeds(messages=messages, sink=Collected(), settings=settings, metrics=Metrics())
        feeds.interval = 0.0  # reconcile back to back: a cancel lands in every phase
        for c in channels:
            feeds.acquire(c)
        feeds.start()
        # Cancel at a random point of the back-to-back reconciles (the fault, not a wait).
        await asyncio.sleep(rng.uniform(0, 0.02))
        await asyncio.wait_for(feeds.stop(), 3)
