"""The registry of this process's SSE streams: limits, fan-out, the heartbeat sweep,
stale and slow-consumer detection, and the shutdown drain.

Everything here runs on the event loop without awaiting between a check and the change
it guards, so "check the limits, then register" is atomic without a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from typing import Any

from server.sse import frames
from server.sse.frames import Frame
from server.sse.stream import CLOSING, FULL, GONE, LIVE, SETUP, WRITTEN, Stream
from shared.errors import RetryLater
from shared.metrics import Metrics
from shared.settings import Settings

logger = logging.getLogger(__name__)

# reconnect_after_ms is drawn from these ranges so that a thousand clients closed at
# once (a restart) do not all come back in the same millisecond.
RECONNECT_MS: dict[str, tuple[int, int]] = {
    "shutdown": (1000, 5000),
    "revoked": (3000, 6000),
    "stale": (3000, 6000),
    "slow_consumer": (5000, 15000),
}
# How long a stream closed for any reason but shutdown may take to flush its close
# event before the connection is dropped.
CLOSE_GRACE_S = 2.0
RETRY_AFTER_PER_IP_S = 5
RETRY_AFTER_BUSY_S = (1, 10)
RETRY_AFTER_DRAINING_S = (1, 5)
RATE_WINDOW_S = 10
# How long after a replay live events are checked against what the replay sent.
DEDUPE_S = 10.0
# How long a revoke or channel deletion is remembered for stream requests whose
# visibility check was in flight when it went by (see ``revoked_since``).
REVOKE_MEMORY_S = 300.0


class RateWindow:
    """Events per second over the last ``window_s`` seconds, in one-second buckets."""

    def __init__(self, window_s: int = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.counts = [0] * window_s
        self.seconds = [-1] * window_s

    def add(self, now: float) -> None:
        sec = int(now)
        i = sec % self.window_s
        if self.seconds[i] != sec:
            self.seconds[i] = sec
            self.counts[i] = 0
        self.counts[i] += 1

    def rate(self, now: float) -> float:
        sec = int(now)
        total = sum(
            c for c, s in zip(self.counts, self.seconds, strict=True) if sec - s < self.window_s
        )
        return total / self.window_s


def tick_interval(settings: Settings) -> float:
    """The sweep period: a tenth of the shorter timer, between 10 ms and 1 s."""
    return min(1.0, max(0.01, min(settings.sse_heartbeat_s, settings.sse_stale_s) / 10))


class StreamManager:
    """Registry keyed by id, indexed by channel (fan-out) and by IP (limits)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.streams: dict[str, Stream] = {}
        self.by_channel: dict[int, set[Stream]] = {}
        self.by_ip: dict[str, set[Stream]] = {}
        self.draining = False
        self.peak = 0
        self.opened_total = 0
        self.rejected: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.stale_detected_total = 0
        self.stale_active = 0
        self.slow_consumer_total = 0
        self.replayed_total = 0
        self.resets_total = 0
        self.rate = RateWindow()
        self.tick_s = tick_interval(settings)
        # (channel id, user id) or (channel id, None) for a deletion -> monotonic time.
        self.revoked: dict[tuple[int, int | None], float] = {}
        self._next_prune = 0.0
        self._empty = asyncio.Event()
        self._empty.set()
        self._task: asyncio.Task[None] | None = None
        self._sent = {
            kind: metrics.sse_events_sent.labels(kind)
            for kind in ("message", "heartbeat", "close", "ready", "reset")
        }
        metrics.sse_active.set_function(lambda: len(self.streams))
        metrics.sse_peak.set_function(lambda: self.peak)
        metrics.sse_stale_active.set_function(lambda: self.stale_active)
        metrics.sse_new_per_s.set_function(lambda: self.rate.rate(time.monotonic()))

    # -- registration --------------------------------------------------------------

    def open(
        self, *, channel_id: int, user_id: int, ip: str, transport: asyncio.Transport | None
    ) -> Stream:
        """Check the limits and register a new stream in one step (no await between),
        or raise RetryLater: 429 per IP or global, 503 while draining."""
        settings = self.settings
        if self.draining:
            self._reject("draining")
            raise RetryLater(
                "the server is shutting down; reconnect shortly",
                code="shutting_down",
                status=503,
                retry_after=random.randint(*RETRY_AFTER_DRAINING_S),
            )
        if len(self.streams) >= settings.sse_max_connections:
            self._reject("global")
            raise RetryLater(
                "this server has no room for another stream",
                code="server_busy",
                status=429,
                retry_after=random.randint(*RETRY_AFTER_BUSY_S),
            )
        peers = self.by_ip.get(ip)
        if peers is not None and len(peers) >= settings.sse_max_per_ip:
            # A browser that reloads closes its old stream a moment before opening the
            # new one: drop the ones whose connection is already gone before refusing.
            for gone in [s for s in peers if s.is_gone()]:
                self.gone(gone)
            if len(peers) >= settings.sse_max_per_ip:
                self._reject("per_ip")
                raise RetryLater(
                    f"too many streams from this address (limit {settings.sse_max_per_ip})",
                    code="too_many_connections",
                    status=429,
                    retry_after=RETRY_AFTER_PER_IP_S,
                )
        now = time.monotonic()
        stream = Stream(channel_id=channel_id, user_id=user_id, ip=ip, transport=transport, now=now)
        self.streams[stream.id] = stream
        self.by_channel.setdefault(channel_id, set()).add(stream)
        self.by_ip.setdefault(ip, set()).add(stream)
        self._empty.clear()
        self.opened_total += 1
        self.rate.add(now)
        self.peak = max(self.peak, len(self.streams))
        self.metrics.sse_opened.inc()
        return stream

    def _reject(self, kind: str) -> None:
        self.rejected[kind] += 1
        self.metrics.sse_rejected.labels(kind).inc()

    def unregister(self, stream: Stream) -> None:
        """Forget a stream and every count it held; safe to call more than once."""
        if self.streams.pop(stream.id, None) is None:
            return
        subs = self.by_channel.get(stream.channel_id)
        if subs is not None:
            subs.discard(stream)
            if not subs:
                del self.by_channel[stream.channel_id]
        peers = self.by_ip.get(stream.ip)
        if peers is not None:
            peers.discard(stream)
            if not peers:
                del self.by_ip[stream.ip]
        if stream.stale:
            self.stale_active -= 1
        reason = stream.close_reason or "gone"
        self.closed[reason] += 1
        self.metrics.sse_closed.labels(reason).inc()
        stream.state = CLOSING
        stream.buffer = None
        stream.wake()
        if not self.streams:
            self._empty.set()

    def gone(self, stream: Stream) -> None:
        """The peer left: nothing to say to it, free its place now."""
        stream.wake()
        self.unregister(stream)

    # -- writing -------------------------------------------------------------------

    def note_write(self, stream: Stream) -> None:
        """The handler is about to write through aiohttp (ready, replay): start the
        stale clock if it is not running."""
        if not stream.dirty:
            stream.start_clock(time.monotonic())

    def count_sent(self, kind: str, n: int = 1) -> None:
        self._sent[kind].inc(n)

    def _trouble(self, stream: Stream, outcome: int) -> None:
        if outcome == GONE:
            self.gone(stream)
        elif outcome == FULL:
            self.close(stream, "slow_consumer")

    def publish_message(self, channel_id: int, message: dict[str, Any]) -> None:
        """Encode a message once and write it to every local subscriber of the channel."""
        subs = self.by_channel.get(channel_id)
        if not subs:
            return
        frame = frames.message(message)
        message_id = int(message["id"])
        now = time.monotonic()
        limit = self.settings.sse_buffer_bytes
        size = len(frame.raw)
        written = 0
        trouble: list[tuple[Stream, int]] = []
        for s in subs:
            state = s.state
            if state == LIVE:
                if s.dedupe_until > now and s.already_sent(message_id):
                    continue
                outcome = s.send(frame, now, limit)
                if outcome == WRITTEN:
                    written += 1
                else:
                    trouble.append((s, outcome))
            elif state == SETUP and s.buffer is not None and s.close_reason is None:
                # Replay in progress: keep it for go_live, bounded like any backlog.
                s.buffer.append((message_id, frame))
                s.buffered_bytes += size
                if s.buffered_bytes > limit:
                    trouble.append((s, FULL))
        for s, outcome in trouble:
            self._trouble(s, outcome)
        if written:
            self._sent["message"].inc(written)

    def go_live(self, stream: Stream) -> None:
        """End SETUP: write what arrived during replay (skipping what the client has or
        was just sent), then switch to direct fan-out, all without an await."""
        if stream.close_reason is not None or stream.state != SETUP:
            return
        now = time.monotonic()
        pending, stream.buffer = stream.buffer or [], None
        stream.state = LIVE
        stream.next_heartbeat = now + self.settings.sse_heartbeat_s
        if stream.sent_id or stream.replayed:
            stream.dedupe_until = now + DEDUPE_S
        limit = self.settings.sse_buffer_bytes
        written = 0
        for message_id, frame in pending:
            if stream.already_sent(message_id):
                continue
            outcome = stream.send(frame, now, limit)
            if outcome != WRITTEN:
                self._trouble(stream, outcome)
                break
            written += 1
        if written:
            self._sent["message"].inc(written)

    def close(self, stream: Stream, reason: str, *, deadline: float | None = None) -> None:
        """Close with a reason: a LIVE stream gets its ``close`` event now; a stream still
        in SETUP gets it from its handler once the current step ends."""
        if stream.close_reason is not None or stream.id not in self.streams:
            return
        now = time.monotonic()
        stream.close_reason = reason
        stream.reconnect_after_ms = random.randint(*RECONNECT_MS[reason])
        stream.closing_deadline = now + CLOSE_GRACE_S if deadline is None else deadline
        if reason == "slow_consumer":
            self.slow_consumer_total += 1
        if stream.state == LIVE:
            stream.state = CLOSING
            if stream.force_write(frames.close(reason, stream.reconnect_after_ms)):
                self._sent["close"].inc()
            else:
                self.gone(stream)
                return
        stream.wake()

    def close_frame(self, stream: Stream) -> Frame:
        """For a handler that ends a stream closed during SETUP."""
        self._sent["close"].inc()
        return frames.close(stream.close_reason or "shutdown", stream.reconnect_after_ms)

    # -- bus events ----------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """Bus listener (one subscription per process, see hub.py)."""
        kind = event.get("type")
        channel_id = event.get("channel_id")
        if isinstance(channel_id, int) and kind in ("revoke", "channel_deleted"):
            user_id = event.get("user_id") if kind == "revoke" else None
            self.revoked[(channel_id, user_id if isinstance(user_id, int) else None)] = (
                time.monotonic()
            )
        if not isinstance(channel_id, int) or channel_id not in self.by_channel:
            return
        if kind == "message":
            message = event.get("message")
            if isinstance(message, dict) and isinstance(message.get("id"), int):
                self.publish_message(channel_id, message)
        elif kind == "revoke":
            user_id = event.get("user_id")
            for s in [s for s in self.by_channel[channel_id] if s.user_id == user_id]:
                self.close(s, "revoked")
        elif kind == "channel_deleted":
            for s in list(self.by_channel[channel_id]):
                self.close(s, "revoked")

    def revoked_since(self, channel_id: int, user_id: int, since: float) -> bool:
        """Whether the user's access to the channel was revoked (or the channel deleted)
        at or after ``since`` (monotonic): a stream request whose visibility check ran
        meanwhile may have read the old state, and no stream of it was there to close."""
        for key in ((channel_id, user_id), (channel_id, None)):
            at = self.revoked.get(key)
            if at is not None and at >= since:
                return True
        return False

    # -- the sweep: heartbeats, stale and slow consumers, vanished peers ------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-sse-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.sweep(time.monotonic())
            except Exception:
                logger.exception("SSE sweep failed")

    def sweep(self, now: float) -> None:
        """One pass over every stream; the only timer the streams have."""
        settings = self.settings
        limit = settings.sse_buffer_bytes
        stale_s = settings.sse_stale_s
        heartbeat_s = settings.sse_heartbeat_s
        heartbeat: Frame | None = None
        beats = 0
        if self.revoked and now >= self._next_prune:
            self._next_prune = now + 10.0
            old = now - REVOKE_MEMORY_S
            self.revoked = {k: at for k, at in self.revoked.items() if at >= old}
        for s in list(self.streams.values()):
            if s.is_gone():
                self.gone(s)
                continue
            if s.dedupe_until and now > s.dedupe_until:
                s.dedupe_until = 0.0
                s.replayed = None
            if s.close_reason is not None:
                if now >= s.closing_deadline:
                    logger.info("SSE %s: dropping, close event not taken in time", s.id)
                    s.abort()
                continue
            if s.dirty:
                pending = s.pending()
                delivered = s.written_total() - pending
                if pending == 0:
                    s.dirty = False
                    s.last_write_at = now
                elif delivered > s.delivered:
                    s.last_write_at = now
                s.delivered = delivered
                if pending > limit:
                    self.close(s, "slow_consumer")
                    continue
                if s.dirty and now - s.last_write_at >= stale_s:
                    self.mark_stale(s)
                    continue
            if s.state == LIVE and now >= s.next_heartbeat:
                if heartbeat is None:
                    heartbeat = frames.heartbeat()
                outcome = s.send(heartbeat, now, limit)
                if outcome != WRITTEN:
                    self._trouble(s, outcome)
                    continue
                beats += 1
                s.next_heartbeat += heartbeat_s
                if s.next_heartbeat <= now:  # the loop was stalled: no burst to catch up
                    s.next_heartbeat = now + heartbeat_s
        if beats:
            self._sent["heartbeat"].inc(beats)

    def mark_stale(self, stream: Stream) -> None:
        logger.info(
            "SSE %s: stale (no write completed for %.1fs)", stream.id, self.settings.sse_stale_s
        )
        stream.stale = True
        self.stale_detected_total += 1
        self.stale_active += 1
        self.close(stream, "stale")

    # -- shutdown ------------------------------------------------------------------

    async def drain(self, window_s: float) -> None:
        """Refuse new streams, send every stream ``close`` (shutdown), wait up to
        ``window_s`` for them to end, then drop the rest."""
        self.draining = True
        deadline = time.monotonic() + window_s
        streams = list(self.streams.values())
        for s in streams:
            self.close(s, "shutdown", deadline=deadline)
        if streams:
            logger.info("draining %d SSE stream(s), up to %.1fs", len(streams), window_s)
        if await self.wait_empty(window_s):
            return
        left = list(self.streams.values())
        logger.warning("dropping %d SSE stream(s) still open after %.1fs", len(left), window_s)
        for s in left:
            s.abort()
        if not await self.wait_empty(1.0):
            for s in list(self.streams.values()):
                self.unregister(s)

    async def wait_empty(self, within_s: float) -> bool:
        try:
            async with asyncio.timeout(within_s):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    # -- reporting -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The ``sse`` section of /health (no IP addresses here)."""
        settings = self.settings
        return {
            "active": len(self.streams),
            "peak": self.peak,
            "opened_total": self.opened_total,
            "rejected_per_ip_total": self.rejected["per_ip"],
            "rejected_global_total": self.rejected["global"],
            "rejected_draining_total": self.rejected["draining"],
            "stale_detected_total": self.stale_detected_total,
            "stale_active": self.stale_active,
            "slow_consumer_total": self.slow_consumer_total,
            "new_per_s": round(self.rate.rate(time.monotonic()), 3),
            "closed_total": dict(sorted(self.closed.items())),
            "replayed_total": self.replayed_total,
            "resets_total": self.resets_total,
            "draining": self.draining,
            "limits": {"per_ip": settings.sse_max_per_ip, "global": settings.sse_max_connections},
        }

    def snapshot(
        self, channel_id: int | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The registry for admins, oldest first."""
        source = (
            self.streams.values() if channel_id is None else self.by_channel.get(channel_id, ())
        )
        chosen = sorted(source, key=lambda s: s.connected_at)[:limit]
        now_mono, now_wall = time.monotonic(), time.time()
        return [s.info(now_mono, now_wall) for s in chosen]
