"""One ordered, gap-free feed of messages per channel, per server process.

PostgreSQL is the truth; the Redis bus is the fast path and may lose, delay or reorder
events (an outage, a Redis restarted empty, a publisher killed between its commit and
its publish, two processes publishing racing posts). Every message carries ``prev_id``,
the channel's previous message id, assigned under the channel's posting lock; so a
feed knows its channel's sequence exactly. Three rules keep every stream whole:

* **Write on only in sequence.** A feed writes message N only when its ``prev_id`` is the
  feed's head (the last id it wrote). An event ahead of a gap is held; one at or below
  the head is a duplicate and dropped. The gap is filled from PostgreSQL (one batched
  query for every channel that needs it) and the held events follow it.
* **Reconcile what the bus never said.** A lost *last* message leaves no gap to see, so
  every ``reconcile_interval`` one pass reads the heads of every channel this process
  follows (a few statements per 64 channels per process, never per stream) and fills
  any feed that is behind; the same pass runs at once when the bus subscription comes
  back. A stream has every message within HERALD_SSE_CATCHUP_S of a fault's end.
* **Know how far is complete.** That pass also yields a watermark: every message of the
  channel with id <= it has been written (see ``MessageService.heads``). Multi-channel
  cursors lean on it (server/sse/cursor.py).

Nothing awaits between reading a feed's head and writing past it: the event loop is
the lock, as in manager.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from shared.bus import MessagePosted
from shared.metrics import Metrics
from shared.services.messages import MessageService, Posted
from shared.settings import Settings
from shared.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# A channel that missed more than this is not filled: its streams get ``reset``.
FILL_MAX = 1000
# Channels per heads statement: each takes that many shared advisory locks, and
# PostgreSQL's lock table is shared by every session (64 x max_connections slots).
HEADS_BATCH = 64
# Events held ahead of a gap, per channel; past it they are dropped (the fill reads them).
HOLD_MAX = 2000
ACCESS_RECHECK_S = 30.0
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0


def reconcile_interval(settings: Settings) -> float:
    """A fifth of the catch-up bound, between 50 ms and 1 s: a fill that fails once
    still has time to succeed within HERALD_SSE_CATCHUP_S."""
    return min(1.0, max(0.05, settings.sse_catchup_s / 5))


class FeedSink(Protocol):
    """Where a feed's messages go (the StreamManager)."""

    def emit(self, channel_id: int, batch: Sequence[Posted]) -> None: ...

    def reset_channel(self, channel_id: int, last_id: int) -> None: ...


class Feed:
    __slots__ = ("channel_id", "head", "held", "ready", "refs", "watermark")

    def __init__(self, channel_id: int) -> None:
        self.channel_id = channel_id
        self.head: int | None = None  # None until the first heads read
        self.watermark = 0
        self.held: dict[int, Posted] = {}  # keyed by prev_id
        self.ready = asyncio.Event()
        self.refs = 0


class Feeds:
    """Every feed of this process, and the one task that fills and reconciles them."""

    def __init__(
        self, *, messages: MessageService, sink: FeedSink, settings: Settings, metrics: Metrics
    ) -> None:
        self.messages = messages
        self.sink = sink
        self.metrics = metrics
        self.interval = reconcile_interval(settings)
        self.feeds: dict[int, Feed] = {}
        # The smallest watermark of the ready feeds: every message with id <= it of any
        # followed channel has been written. Only rises.
        self.watermark = 0
        self._dirty: set[int] = set()
        self._wake = asyncio.Event()
        self._full_due = 0.0
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        # Access re-checks (the manager's, who holds the streams): at once after the bus
        # was lost, on every pass while it is down, and every ACCESS_RECHECK_S anyway (a
        # removal's publisher killed after its commit loses the event too).
        self.access_check: Callable[[], Awaitable[None]] | None = None
        self.bus_up = True
        self._recheck = False
        self._next_access_check = time.monotonic() + ACCESS_RECHECK_S
        # Labelled children looked up once: on_message runs for every bus event.
        events = metrics.sse_feed_events
        self._in_order = events.labels("in_order")
        self._gap = events.labels("gap")
        self._duplicate = events.labels("duplicate")

    # -- following channels --------------------------------------------------------

    def acquire(self, channel_id: int) -> Feed:
        """A stream follows the channel: its feed (new ones are read at once)."""
        feed = self.feeds.get(channel_id)
        if feed is None:
            feed = self.feeds[channel_id] = Feed(channel_id)
            self._want(channel_id)
        feed.refs += 1
        return feed

    def release(self, channel_id: int) -> None:
        feed = self.feeds.get(channel_id)
        if feed is None:
            return
        feed.refs -= 1
        if feed.refs <= 0:
            del self.feeds[channel_id]
            self._dirty.discard(channel_id)

    async def wait_ready(self, channel_ids: Iterable[int], timeout_s: float) -> bool:
        """Wait until every feed named has read its head; False after ``timeout_s``."""
        pending = [f.ready.wait() for c in channel_ids if (f := self.feeds.get(c)) is not None]
        if not pending:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*pending)
        except TimeoutError:
            return False
        return True

    # -- the bus -------------------------------------------------------------------

    def on_message(self, event: MessagePosted) -> None:
        feed = self.feeds.get(event.channel_id)
        if feed is None:
            return
        stored = Posted(event.message, event.prev_id)
        if feed.head is None or self._recheck:
            # Not before the head is known, nor before access is re-checked after an
            # outage (a removal's event may have been lost with it).
            self._hold(feed, stored)
            self._want(feed.channel_id)
            return
        if stored.id <= feed.head:
            self._duplicate.inc()
            return
        if stored.prev_id == feed.head:
            self._in_order.inc()
            self._write(feed, [stored])
            return
        self._gap.inc()
        self._hold(feed, stored)
        self._want(feed.channel_id)

    def bus_lost(self) -> None:
        """The bus subscription dropped: events may be lost from now on, removals among
        them. Until access is re-checked, nothing is written on what the bus says."""
        self.bus_up = False
        self._recheck = True

    def bus_back(self) -> None:
        self.bus_up = True
        self.resync()

    def resync(self) -> None:
        """The bus came back (or may have lost events): reconcile every feed now."""
        self._full_due = 0.0
        self._wake.set()

    # -- writing -------------------------------------------------------------------

    def _hold(self, feed: Feed, stored: Posted) -> None:
        if len(feed.held) >= HOLD_MAX:
            feed.held.clear()  # the fill reads them from PostgreSQL instead
        key = -stored.id if stored.prev_id is None else stored.prev_id
        feed.held[key] = stored

    def _write(self, feed: Feed, batch: list[Posted]) -> None:
        """Write ``batch`` (in sequence after the head) and what it unblocks."""
        head = batch[-1].id
        held = feed.held
        while held and head in held:
            nxt = held.pop(head)
            batch.append(nxt)
            head = nxt.id
        feed.head = head
        if held:
            for key in [k for k, p in held.items() if p.id <= head]:
                del held[key]
        self.sink.emit(feed.channel_id, batch)

    def _want(self, channel_id: int) -> None:
        self._dirty.add(channel_id)
        self._wake.set()

    # -- the task ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-sse-feeds")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        delay = RETRY_FIRST_S
        task = asyncio.current_task()
        while True:
            # A cancel can be lost on its way in: aiopg waits with asyncio.wait_for, which
            # on Python 3.11 returns a result that was ready and drops the cancel. A lost
            # one would keep this loop going and stop() (the server's exit) waiting forever.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            now = time.monotonic()
            if not self._dirty and now < self._full_due:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._full_due - now):
                        await self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            if now >= self._full_due:
                targets = set(self.feeds)
                self._full_due = now + self.interval
            else:
                targets = set(self._dirty)
            self._dirty -= targets
            try:
                await self.sync(targets)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._dirty |= {c for c in targets if c in self.feeds}
                if not self._failing:
                    # One line per state change, not one per attempt.
                    logger.warning("feeds: reading PostgreSQL failed (%s); retrying", exc)
                    self._failing = True
                self.metrics.sse_feed_errors.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self._failing:
                logger.info("feeds: PostgreSQL answers again; feeds caught up")
                self._failing = False
            delay = RETRY_FIRST_S

    async def sync(self, channel_ids: Iterable[int]) -> None:
        """Read the heads of these channels and bring each feed up to them."""
        now = time.monotonic()
        if self._recheck or not self.bus_up or now >= self._next_access_check:
            if self.access_check is not None:
                await self.access_check()
            self._next_access_check = now + ACCESS_RECHECK_S
            if self.bus_up:
                self._recheck = False
        ids = sorted(c for c in channel_ids if c in self.feeds)
        for start in range(0, len(ids), HEADS_BATCH):
            await self._sync_batch(ids[start : start + HEADS_BATCH])
        ready = [f.watermark for f in self.feeds.values() if f.head is not None]
        if ready:
            self.watermark = max(self.watermark, min(ready))

    async def _sync_batch(self, ids: list[int]) -> None:
        watermark, heads = await self.messages.heads(ids)
        behind: dict[int, int] = {}
        for channel_id in ids:
            feed = self.feeds.get(channel_id)
            if feed is None:
                continue
            head = heads.get(channel_id, 0)
            if feed.head is None:
                # New feed: it starts at the channel's head (streams replay before it).
                feed.head = head
                feed.watermark = watermark
                for key in [k for k, p in feed.held.items() if p.id <= head]:
                    del feed.held[key]
                feed.ready.set()
                if head in feed.held:
                    self._write(feed, [feed.held.pop(head)])
            elif head > feed.head:
                behind[channel_id] = feed.head
            else:
                feed.watermark = max(feed.watermark, watermark)
        if not behind:
            return
        rows = await self.messages.fill(behind, FILL_MAX + 1)
        by_channel: dict[int, list[Posted]] = {}
        for stored in rows:
            by_channel.setdefault(stored.channel_id, []).append(stored)
        for channel_id, start in behind.items():
            feed = self.feeds.get(channel_id)
            if feed is None or feed.head is None:
                continue
            found = by_channel.get(channel_id, [])
            if len(found) > FILL_MAX and feed.head == start:
                # Too much to send: the channel's streams refetch over REST.
                feed.head = heads[channel_id]
                feed.held.clear()
                self.metrics.sse_feed_resets.inc()
                logger.warning(
                    "feed %d: more than %d messages missed; streams get reset",
                    channel_id,
                    FILL_MAX,
                )
                self.sink.reset_channel(channel_id, feed.head)
                self._dirty.add(channel_id)  # anything newer than that head
                self._wake.set()
                continue
            batch = [p for p in found if p.id > feed.head]
            if batch:
                self.metrics.sse_feed_filled.inc(len(batch))
                self._write(feed, batch)
            if feed.head >= heads[channel_id]:
                feed.watermark = max(feed.watermark, watermark)
