"""The registry of this process's SSE streams: limits, fan-out, the heartbeat sweep,
stale and slow-consumer detection, and the shutdown drain.

Everything here runs on the event loop without awaiting between a check and the change
it guards, so "check the limits, then register" is atomic without a lock.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

from server.sse import cursor, frames
from server.sse.feeds import Feeds
from server.sse.frames import Frame
from server.sse.leases import IpLeases
from server.sse.stream import (
    CHOSEN,
    CLOSING,
    FULL,
    GONE,
    LIVE,
    MEMBERSHIP,
    ONE,
    SETUP,
    WRITTEN,
    Batch,
    Outbox,
    Stream,
    new_stream_id,
)
from server.sse.wheel import HeartbeatWheel
from shared.bus import BusEvent, MemberAdded, MemberRemoved, MessagePosted, TokenRevoked
from shared.enforcement import SSE_LIMITS, Enforcement
from shared.errors import RetryLater
from shared.metrics import Metrics, Tally
from shared.services.channels import ChannelService
from shared.services.messages import MessageService, Posted
from shared.settings import Settings
from shared.tasks import cancel_and_wait

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
    """Registry keyed by id, indexed by channel (fan-out), by IP (limits) and, for
    streams that follow memberships, by user."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.streams: dict[str, Stream] = {}
        self.outbox = Outbox()
        self.by_channel: dict[int, set[Stream]] = {}
        self.by_ip: dict[str, set[Stream]] = {}
        self.by_user: dict[int, set[Stream]] = {}
        # token id -> its open streams, and (expiry, stream id, stream) for streams whose
        # token expires: the token watch (tokens.py) works per token and per due
        # expiry, never per stream per pass. Entries of ended streams are skipped there.
        self.by_token: dict[int, set[Stream]] = {}
        self.expiring: list[tuple[float, str, Stream]] = []
        self.enforcement = Enforcement(settings.observe_only, metrics)
        self.draining = False
        self.peak = 0
        self.stale_active = 0
        # Each figure /health shows and its Prometheus counter, moved together.
        self.opened = Tally(metrics.sse_opened)
        self.rejected = Tally(metrics.sse_rejected)
        self.closed = Tally(metrics.sse_closed)
        self.stale_detected = Tally(metrics.sse_stale_detected)
        self.slow_consumers = Tally(metrics.sse_slow_consumers)
        self.replayed = Tally(metrics.sse_replayed)
        self.resets = Tally(metrics.sse_resets)
        self.sent = Tally(metrics.sse_events_sent)
        self.subscriptions = Tally(metrics.sse_subscriptions)
        self.rate = RateWindow()
        self.tick_s = tick_interval(settings)
        # Live streams by when their heartbeat is due; the streams every tick looks at
        # are in outbox.watched (see Outbox).
        self.wheel = HeartbeatWheel(self.tick_s)
        self.watched = self.outbox.watched
        # (channel id, user id) or (channel id, None) for a deletion -> monotonic time.
        self.revoked: dict[tuple[int, int | None], float] = {}
        # user id -> [(channel id, since, monotonic time)]: joins, for membership
        # streams whose channel list was being read when they went by.
        self.joined: dict[int, list[tuple[int, int, float]]] = {}
        self._next_prune = 0.0
        self._empty = asyncio.Event()
        self._empty.set()
        self._task: asyncio.Task[None] | None = None
        self._catch_ups: set[asyncio.Task[None]] = set()
        # Set by attach() when the app starts: the feeds, the message reads that
        # catch-ups need, and the key that signs multi-channel cursors.
        self.feeds: Feeds | None = None
        self.messages: MessageService | None = None
        self.leases: IpLeases | None = None
        self.channels: ChannelService | None = None
        self.cursor_key = b""
        metrics.sse_active.set_function(lambda: len(self.streams))
        metrics.sse_peak.set_function(lambda: self.peak)
        metrics.sse_stale_active.set_function(lambda: self.stale_active)
        metrics.sse_limit.labels("global").set(settings.sse_max_connections)
        metrics.sse_limit.labels("per_ip").set(settings.sse_max_per_ip)
        metrics.sse_busiest_ip.set_function(
            lambda: max((len(peers) for peers in self.by_ip.values()), default=0)
        )

    def attach(
        self,
        feeds: Feeds,
        messages: MessageService,
        cursor_key: bytes,
        leases: IpLeases | None = None,
        channels: ChannelService | None = None,
    ) -> None:
        self.feeds = feeds
        self.messages = messages
        self.cursor_key = cursor_key
        self.leases = leases
        self.channels = channels

    # The figures under their first names (tests and /health read these).
    @property
    def opened_total(self) -> int:
        return self.opened.total

    @property
    def stale_detected_total(self) -> int:
        return self.stale_detected.total

    @property
    def slow_consumer_total(self) -> int:
        return self.slow_consumers.total

    @property
    def replayed_total(self) -> int:
        return self.replayed.total

    @property
    def resets_total(self) -> int:
        return self.resets.total

    # -- registration --------------------------------------------------------------

    def open(
        self,
        *,
        user_id: int,
        ip: str,
        transport: asyncio.Transport | None,
        channel_id: int | None = None,
        channels: Iterable[int] = (),
        kind: int = ONE,
        stream_id: str | None = None,
        token_id: int = 0,
        token_expires_at: float | None = None,
    ) -> Stream:
        """Check the limits and register a new stream in one step (no await between),
        or raise RetryLater: 429 per IP or global, 503 while draining."""
        settings = self.settings
        # Coming from take_ip_slot (a stream id), the limits were checked there once:
        # observe-only counts a would-be refusal per stream, not per check.
        again = stream_id is not None
        self._check_room(again=again)
        peers = self.by_ip.get(ip)
        if peers is not None and len(peers) >= settings.sse_max_per_ip:
            # A browser that reloads closes its old stream a moment before opening the
            # new one: drop the ones whose connection is already gone before refusing.
            for gone in [s for s in peers if s.is_gone()]:
                self.gone(gone)
            if len(peers) >= settings.sse_max_per_ip and self.enforcement.enforces(
                SSE_LIMITS,
                f"a stream over the per-address limit ({settings.sse_max_per_ip})",
                again=again and self.leases is not None,
            ):
                self._reject("per_ip")
                raise RetryLater(
                    f"too many streams from this address (limit {settings.sse_max_per_ip})",
                    code="too_many_connections",
                    status=429,
                    retry_after=RETRY_AFTER_PER_IP_S,
                )
        now = time.monotonic()
        followed = {channel_id} if channel_id is not None else set(channels)
        stream = Stream(
            channels=followed,
            user_id=user_id,
            ip=ip,
            transport=transport,
            outbox=self.outbox,
            kind=kind,
            now=now,
            stream_id=stream_id,
            token_id=token_id,
            token_expires_at=token_expires_at,
        )
        self.streams[stream.id] = stream
        self.watched.add(stream)  # aiohttp holds it until the hand-over
        for c in followed:
            self._follow(stream, c)
        self.by_ip.setdefault(ip, set()).add(stream)
        if kind == MEMBERSHIP:
            self.by_user.setdefault(user_id, set()).add(stream)
        if token_id:
            self.by_token.setdefault(token_id, set()).add(stream)
        if token_expires_at is not None:
            if len(self.expiring) > 2 * len(self.streams) + 64:
                # Ended streams' entries: drop them before the heap outgrows the registry.
                self.expiring = [e for e in self.expiring if self.streams.get(e[1]) is e[2]]
                heapq.heapify(self.expiring)
            heapq.heappush(self.expiring, (token_expires_at, stream.id, stream))
        self._empty.clear()
        self.opened.inc()
        self.rate.add(now)
        self.peak = max(self.peak, len(self.streams))
        return stream

    def _follow(self, stream: Stream, channel_id: int) -> None:
        self.by_channel.setdefault(channel_id, set()).add(stream)
        if self.feeds is not None:
            self.feeds.acquire(channel_id)

    def _unfollow(self, stream: Stream, channel_id: int) -> None:
        subs = self.by_channel.get(channel_id)
        if subs is not None and stream in subs:
            subs.discard(stream)
            if not subs:
                del self.by_channel[channel_id]
            if self.feeds is not None:
                self.feeds.release(channel_id)

    def _reject(self, kind: str) -> None:
        self.rejected.inc(kind)

    def _check_room(self, *, again: bool = False) -> None:
        """503 while draining, 429 ``server_busy`` when this process is full."""
        if self.draining:
            self._reject("draining")
            raise RetryLater(
                "the server is shutting down; reconnect shortly",
                code="shutting_down",
                status=503,
                retry_after=random.randint(*RETRY_AFTER_DRAINING_S),
            )
        limit = self.settings.sse_max_connections
        if len(self.streams) >= limit and self.enforcement.enforces(
            SSE_LIMITS, f"a stream over this process's limit ({limit})", again=again
        ):
            self._reject("global")
            raise RetryLater(
                "this server has no room for another stream",
                code="server_busy",
                status=429,
                retry_after=random.randint(*RETRY_AFTER_BUSY_S),
            )

    async def take_ip_slot(self, ip: str) -> str:
        """Before ``open``: a slot for ``ip`` among every process sharing the Redis (see
        leases.py); returns the id the stream must be opened with, or raises the same
        429 as the local per-IP limit."""
        self._check_room()  # the same order of answers as ``open``
        stream_id = new_stream_id()
        limit = self.settings.sse_max_per_ip
        if (
            self.leases is not None
            and not await self.leases.take(ip, stream_id)
            and self.enforcement.enforces(
                SSE_LIMITS, f"a stream over the cluster's per-address limit ({limit})"
            )
        ):
            self._reject("per_ip")
            raise RetryLater(
                f"too many streams from this address (limit {self.settings.sse_max_per_ip})",
                code="too_many_connections",
                status=429,
                retry_after=RETRY_AFTER_PER_IP_S,
            )
        return stream_id

    async def admit(
        self,
        *,
        user_id: int,
        ip: str,
        transport: asyncio.Transport | None,
        channel_id: int | None = None,
        channels: Iterable[int] = (),
        kind: int = ONE,
        token_id: int = 0,
        token_expires_at: float | None = None,
    ) -> Stream:
        """The per-IP slot across processes, then ``open``; the slot goes back if the
        local limits refuse."""
        stream_id = await self.take_ip_slot(ip)
        try:
            return self.open(
                user_id=user_id,
                ip=ip,
                transport=transport,
                channel_id=channel_id,
                channels=channels,
                kind=kind,
                stream_id=stream_id,
                token_id=token_id,
                token_expires_at=token_expires_at,
            )
        except BaseException:
            self.give_back_ip_slot(ip, stream_id)
            raise

    def give_back_ip_slot(self, ip: str, stream_id: str) -> None:
        if self.leases is not None:
            self.leases.release(ip, stream_id)

    def ip_holders(self) -> list[tuple[str, list[str]]]:
        return [(ip, [s.id for s in streams]) for ip, streams in self.by_ip.items()]

    def unregister(self, stream: Stream) -> None:
        """Forget a stream and every count it held; safe to call more than once."""
        # First: a write after the end (a replay page) may have put it back in watched.
        self.watched.discard(stream)
        self.wheel.discard(stream)
        if self.streams.pop(stream.id, None) is None:
            return
        for c in stream.channels:
            self._unfollow(stream, c)
        peers = self.by_ip.get(stream.ip)
        if peers is not None:
            peers.discard(stream)
            if not peers:
                del self.by_ip[stream.ip]
        mine = self.by_user.get(stream.user_id)
        if mine is not None:
            mine.discard(stream)
            if not mine:
                del self.by_user[stream.user_id]
        held = self.by_token.get(stream.token_id)
        if held is not None:
            held.discard(stream)
            if not held:
                del self.by_token[stream.token_id]
        if stream.stale:
            self.stale_active -= 1
        self.give_back_ip_slot(stream.ip, stream.id)
        self.closed.inc(stream.close_reason or "gone")
        stream.state = CLOSING
        stream.buffer = None
        stream.catching_up = None
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
        self.sent.inc(kind, n)

    def _trouble(self, stream: Stream, outcome: int) -> None:
        if outcome == GONE:
            self.gone(stream)
        elif outcome == FULL:
            self.close(stream, "slow_consumer")

    def emit(self, channel_id: int, batch: Sequence[Posted]) -> None:
        """A feed's next messages of a channel, in order: encoded once each, written to
        every local stream of the channel, one write per stream (feeds.py calls this)."""
        subs = self.by_channel.get(channel_id)
        if not subs:
            return
        encoded: Batch = [(p.id, frames.message_frames(p.message)) for p in batch]
        size = sum(len(f.bare.chunked) for _, f in encoded)
        now = time.monotonic()
        limit = self.settings.sse_buffer_bytes
        trouble: list[tuple[Stream, int]] = []
        written = 0
        # The hot path (one message, per-channel streams) inline: no list, no call.
        single = encoded[0] if len(encoded) == 1 else None
        for s in subs:
            state = s.state
            if state == LIVE:
                if single is not None and s.positions is None:
                    if single[0] <= s.sent_id:
                        continue
                    s.sent_id = single[0]
                    outcome = s.send(single[1].with_id, now, limit)
                    n = 1
                elif s.catching_up is not None and channel_id in s.catching_up:
                    s.catching_up[channel_id].append(encoded)
                    continue
                else:
                    outcome, n = self._write_batch(s, channel_id, encoded, now, limit)
                if outcome == WRITTEN:
                    written += n
                else:
                    trouble.append((s, outcome))
            elif state == SETUP and s.buffer is not None and s.close_reason is None:
                # Replay in progress: keep it for go_live, bounded like any backlog.
                s.buffer.append((channel_id, encoded))
                s.buffered_bytes += size
                if s.buffered_bytes > limit:
                    trouble.append((s, FULL))
        self.sent.inc("message", written)
        for s, outcome in trouble:
            self._trouble(s, outcome)

    def _write_batch(
        self, s: Stream, channel_id: int, encoded: Batch, now: float, limit: int
    ) -> tuple[int, int]:
        """Write what of ``encoded`` the stream has not had, in one write: per-channel
        streams get each frame with its id; multi-channel ones the bare frames and then
        their cursor. Nothing awaits here. Returns the outcome and how many it wrote."""
        positions = s.positions
        if positions is None:
            after = s.sent_id
            parts = [f.with_id for mid, f in encoded if mid > after]
            if not parts:
                return WRITTEN, 0
            s.sent_id = encoded[-1][0]
            if len(parts) == 1:
                data = parts[0].chunked if s.chunked else parts[0].raw
            else:
                data = b"".join(p.chunked if s.chunked else p.raw for p in parts)
        else:
            after = positions.get(channel_id, -1)
            bare = [f.bare for mid, f in encoded if mid > after]
            if not bare:
                return WRITTEN, 0
            positions[channel_id] = encoded[-1][0]
            data = b"".join(b.chunked if s.chunked else b.raw for b in bare) + s.frame_bytes(
                frames.cursor_id(self.cursor_for(s))
            )
            parts = bare
        return s.send_bytes(data, now, limit, events=len(parts)), len(parts)

    def cursor_for(self, s: Stream) -> str:
        """The stream's cursor now: the process's watermark, plus the channels where
        the stream's position differs from it (see cursor.py). A channel whose position
        the watermark passed needs no entry, and no dedupe either: every later message
        of it has a larger id."""
        positions = s.positions
        assert positions is not None
        watermark = self.feeds.watermark if self.feeds is not None else 0
        keep = s.catching_up
        for c in [c for c, p in positions.items() if p <= watermark]:
            if keep is None or c not in keep:
                del positions[c]
        return cursor.encode(self.cursor_key, watermark, positions, s.channels)

    def go_live(self, stream: Stream) -> None:
        """End SETUP: write what arrived during replay (skipping what the client has or
        was just sent), then switch to direct fan-out, all without an await."""
        if stream.close_reason is not None or stream.state != SETUP:
            return
        now = time.monotonic()
        pending, stream.buffer = stream.buffer or [], None
        stream.state = LIVE
        stream.next_heartbeat = now + self.settings.sse_heartbeat_s
        self.wheel.add(stream)
        limit = self.settings.sse_buffer_bytes
        joined = stream.catching_up
        for channel_id, encoded in pending:
            if channel_id not in stream.channels:
                continue
            if joined is not None and channel_id in joined:
                joined[channel_id].append(encoded)
                continue
            outcome, n = self._write_batch(stream, channel_id, encoded, now, limit)
            if outcome != WRITTEN:
                self._trouble(stream, outcome)
                return
            self.sent.inc("message", n)
        # Channels joined during SETUP: announced now, replayed from their join.
        for channel_id in list(joined or ()):
            if stream.state != LIVE:
                return
            assert stream.positions is not None
            self._start_catch_up(stream, channel_id, stream.positions[channel_id])

    def write_now(self, stream: Stream, raw: bytes, kind: str) -> bool:
        """One control frame (subscribed, unsubscribed, reset) to a live stream; False
        if the stream is gone or full (and then closed)."""
        outcome = stream.send_bytes(
            stream.frame_bytes(raw), time.monotonic(), self.settings.sse_buffer_bytes
        )
        if outcome != WRITTEN:
            self._trouble(stream, outcome)
            return False
        self.sent.inc(kind)
        return True

    def reset_channel(self, channel_id: int, last_id: int) -> None:
        """The feed skipped ahead (too much missed): every stream of the channel is told
        to refetch it up to ``last_id``."""
        for s in list(self.by_channel.get(channel_id, ())):
            if s.state == SETUP:
                self._reset_setup(s)
                continue
            if s.state != LIVE:
                continue
            self.resets.inc()
            if s.positions is None:
                s.sent_id = last_id
                self.write_now(s, frames.reset(last_id), "reset")
            else:
                s.positions[channel_id] = last_id
                if s.catching_up is not None:
                    s.catching_up.pop(channel_id, None)
                self.write_now(
                    s,
                    frames.reset_multi(channel_id, last_id) + frames.cursor_id(self.cursor_for(s)),
                    "reset",
                )

    def _reset_setup(self, s: Stream) -> None:
        # A stream still replaying cannot be written now, and its replay ends where the
        # feed's skip begins. Close it: the client reconnects at once (shutdown's short
        # delay) and replays, or gets its own reset, from PostgreSQL.
        self.close(s, "shutdown")

    def close(self, stream: Stream, reason: str, *, deadline: float | None = None) -> None:
        """Close with a reason: a LIVE stream gets its ``close`` event now; a stream still
        in SETUP gets it from its handler once the current step ends."""
        if stream.close_reason is not None or stream.id not in self.streams:
            return
        now = time.monotonic()
        stream.close_reason = reason
        self.watched.add(stream)  # its close event flushed or its deadline passed
        stream.reconnect_after_ms = random.randint(*RECONNECT_MS[reason])
        stream.closing_deadline = now + CLOSE_GRACE_S if deadline is None else deadline
        if reason == "slow_consumer":
            self.slow_consumers.inc()
        if stream.state == LIVE:
            stream.state = CLOSING
            if stream.force_write(frames.close(reason, stream.reconnect_after_ms)):
                self.sent.inc("close")
            else:
                self.gone(stream)
                return
            if stream.detached:
                stream.end_body()  # no handler left to end it
        stream.wake()

    def close_frame(self, stream: Stream) -> Frame:
        """For a handler that ends a stream closed during SETUP."""
        self.sent.inc("close")
        return frames.close(stream.close_reason or "shutdown", stream.reconnect_after_ms)

    # -- bus events ----------------------------------------------------------------

    def on_event(self, event: BusEvent) -> None:
        """Bus listener (one subscription per process, see hub.py)."""
        if isinstance(event, MessagePosted):
            if self.feeds is not None:
                self.feeds.on_message(event)
            return
        if isinstance(event, TokenRevoked):
            return  # server/sse/tokens.py listens for these
        now = time.monotonic()
        channel_id = event.channel_id
        if isinstance(event, MemberAdded):
            self.joined.setdefault(event.user_id, []).append((channel_id, event.since, now))
            for s in list(self.by_user.get(event.user_id, ())):
                self.subscribe(s, channel_id, event.since)
            return
        user_id = event.user_id if isinstance(event, MemberRemoved) else None
        self.revoked[(channel_id, user_id)] = now
        for s in list(self.by_channel.get(channel_id, ())):
            if user_id is None or s.user_id == user_id:
                self.unsubscribe(s, channel_id)

    def revoked_since(self, channel_id: int, user_id: int, since: float) -> bool:
        """Whether the user's access to the channel was revoked (or the channel deleted)
        at or after ``since`` (monotonic): a stream request whose visibility check ran
        meanwhile may have read the old state, and no stream of it was there to close."""
        for key in ((channel_id, user_id), (channel_id, None)):
            at = self.revoked.get(key)
            if at is not None and at >= since:
                return True
        return False

    async def recheck_access(self) -> None:
        """Drop what open streams may no longer see, as their removal event would have
        (feeds.py calls this when bus events may have been lost): a per-channel or
        chosen-channels stream keeps a channel while its user may see it, a membership
        stream while its user is a member."""
        if self.channels is None or not self.streams:
            return
        wanted: dict[tuple[int, int], bool] = {}
        for s in self.streams.values():
            for c in s.channels:
                key = (c, s.user_id)
                wanted[key] = wanted.get(key, False) or s.kind == MEMBERSHIP
        lost = await self.channels.lost_access(
            [(c, u, member) for (c, u), member in wanted.items()]
        )
        for c, u in lost:
            for s in list(self.by_channel.get(c, ())):
                if s.user_id == u:
                    self.unsubscribe(s, c)
        if lost:
            logger.info("SSE: %d channel follow(s) dropped on an access re-check", len(lost))

    def joined_since(self, user_id: int, since: float) -> list[tuple[int, int]]:
        """Channels the user joined at or after ``since``, with each join's position."""
        return [(c, pos) for c, pos, at in self.joined.get(user_id, ()) if at >= since]

    # -- channels joining and leaving open streams ---------------------------------

    def unsubscribe(self, stream: Stream, channel_id: int) -> None:
        """Access to the channel ended: a per-channel stream closes (``revoked``); a
        multi-channel stream drops it with ``unsubscribed`` and stays open (a chosen
        list closes once nothing of it is left)."""
        if stream.kind == ONE:
            self.close(stream, "revoked")
            return
        if channel_id not in stream.channels:
            return
        stream.channels = tuple(c for c in stream.channels if c != channel_id)
        self._unfollow(stream, channel_id)
        if stream.positions is not None:
            stream.positions.pop(channel_id, None)
        if stream.catching_up is not None:
            stream.catching_up.pop(channel_id, None)
        self.subscriptions.inc("unsubscribed")
        if stream.state == LIVE:
            self.write_now(stream, frames.unsubscribed(channel_id), "unsubscribed")
        if stream.kind == CHOSEN and not stream.channels:
            self.close(stream, "revoked")

    def subscribe(self, stream: Stream, channel_id: int, since: int) -> None:
        """A membership stream's user joined ``channel_id``: follow it from ``since``
        (the channel's newest id at the join); what came after is replayed first."""
        if channel_id in stream.channels or stream.close_reason is not None:
            return
        if stream.state not in (LIVE, SETUP) or stream.positions is None:
            return
        stream.channels = tuple(sorted((*stream.channels, channel_id)))
        self._follow(stream, channel_id)
        stream.positions[channel_id] = since
        self.subscriptions.inc("subscribed")
        if stream.catching_up is None:
            stream.catching_up = {}
        stream.catching_up[channel_id] = []
        if stream.state == LIVE:  # in SETUP, go_live starts it
            self._start_catch_up(stream, channel_id, since)

    def _start_catch_up(self, stream: Stream, channel_id: int, since: int) -> None:
        if not self.write_now(stream, frames.subscribed(channel_id), "subscribed"):
            return
        task = asyncio.create_task(self._catch_up(stream, channel_id, since))
        self._catch_ups.add(task)
        task.add_done_callback(self._catch_ups.discard)

    async def _catch_up(self, stream: Stream, channel_id: int, since: int) -> None:
        """Replay a newly joined channel up to its feed's head, then let the feed write."""
        try:
            await self._replay_joined(stream, channel_id, since)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("SSE %s: catch-up of channel %d failed; closing", stream.id, channel_id)
            self.close(stream, "shutdown")

    async def _replay_joined(self, stream: Stream, channel_id: int, since: int) -> None:
        feeds, messages = self.feeds, self.messages
        if feeds is None or messages is None:
            return
        await feeds.wait_ready([channel_id], self.settings.backend_timeout_s)
        feed = feeds.feeds.get(channel_id)
        if feed is None or feed.head is None or stream.catching_up is None:
            return
        head = feed.head
        limit = self.settings.sse_buffer_bytes
        missed = 0
        if head > since:
            missed = (await messages.count_between({channel_id: (since, head)}, 1001))[channel_id]
        after = since
        while missed and after < head and stream.state == LIVE:
            rows = await messages.between({channel_id: (since, head)}, after, 100)
            if not rows or missed > 1000:
                break
            if stream.state != LIVE or stream.positions is None:
                return
            data = b"".join(frames.message_frames(r).bare.raw for r in rows)
            after = rows[-1]["id"]
            stream.positions[channel_id] = after
            outcome = stream.send_bytes(
                stream.frame_bytes(data + frames.cursor_id(self.cursor_for(stream))),
                time.monotonic(),
                limit,
                events=len(rows),
            )
            if outcome != WRITTEN:
                self._trouble(stream, outcome)
                return
            self.replayed.inc(n=len(rows))
            self.sent.inc("message", len(rows))
        if stream.state != LIVE or stream.catching_up is None or stream.positions is None:
            return
        waiting = stream.catching_up.pop(channel_id, None)
        if not stream.catching_up:
            stream.catching_up = None
        if waiting is None:
            return
        if missed > 1000:
            stream.positions[channel_id] = head
            self.resets.inc()
            if not self.write_now(
                stream,
                frames.reset_multi(channel_id, head) + frames.cursor_id(self.cursor_for(stream)),
                "reset",
            ):
                return
        now = time.monotonic()
        for encoded in waiting:
            outcome, n = self._write_batch(stream, channel_id, encoded, now, limit)
            if outcome != WRITTEN:
                self._trouble(stream, outcome)
                return
            self.sent.inc("message", n)

    # -- the sweep: heartbeats, stale and slow consumers, vanished peers ------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-sse-sweep")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task, *self._catch_ups)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.sweep(time.monotonic())
            except Exception:
                logger.exception("SSE sweep failed")

    def sweep(self, now: float) -> None:
        """One tick, the only timer the streams have: the watched streams (a write not
        yet known delivered, closing, or still held by aiohttp) are checked, and the
        streams whose heartbeat is due get it. An idle handed-over stream is looked at
        once per heartbeat, not once per tick."""
        if self.revoked and now >= self._next_prune:
            self._next_prune = now + 10.0
            old = now - REVOKE_MEMORY_S
            self.revoked = {k: at for k, at in self.revoked.items() if at >= old}
            self.joined = {
                u: kept
                for u, joins in self.joined.items()
                if (kept := [j for j in joins if j[2] >= old])
            }
        if self.watched:
            self._check_watched(now)
        self._heartbeats(now)

    def _check_watched(self, now: float) -> None:
        limit = self.settings.sse_buffer_bytes
        stale_s = self.settings.sse_stale_s
        watched, streams = self.watched, self.streams
        for s in list(watched):
            if streams.get(s.id) is not s:
                watched.discard(s)  # ended, then written to (a replay's last page)
                continue
            if s.is_gone():
                self.gone(s)
                continue
            if s.close_reason is not None:
                if now >= s.closing_deadline:
                    logger.info("SSE %s: dropping, close event not taken in time", s.id)
                    s.abort()
                elif s.detached:
                    s.close_if_flushed()
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
                if pending - s.queued_bytes > limit:  # the peer's backlog, not our queue
                    self.close(s, "slow_consumer")
                    continue
                if s.dirty and now - s.last_write_at >= stale_s:
                    self.mark_stale(s)
                    continue
            if not s.dirty and s.detached:
                watched.discard(s)

    def _heartbeats(self, now: float) -> None:
        due = self.wheel.turn(now)
        if not due:
            return
        limit = self.settings.sse_buffer_bytes
        heartbeat_s = self.settings.sse_heartbeat_s
        heartbeat = frames.heartbeat()
        wheel = self.wheel
        beats = 0
        for s in due:
            if s.state != LIVE:
                continue  # closing: it gets no more heartbeats
            if now < s.next_heartbeat:
                wheel.add(s)  # filed in this tick's slot but due later in it
                continue
            outcome = s.send(heartbeat, now, limit, direct=True)
            if outcome != WRITTEN:
                self._trouble(s, outcome)
                continue
            beats += 1
            s.next_heartbeat += heartbeat_s
            if s.next_heartbeat <= now:  # the loop was stalled: no burst to catch up
                s.next_heartbeat = now + heartbeat_s
            wheel.add(s)
        self.sent.inc("heartbeat", beats)

    def mark_stale(self, stream: Stream) -> None:
        logger.info(
            "SSE %s: stale (no write completed for %.1fs)", stream.id, self.settings.sse_stale_s
        )
        stream.stale = True
        self.stale_detected.inc()
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
            "opened_total": self.opened.total,
            "rejected_per_ip_total": self.rejected["per_ip"],
            "rejected_global_total": self.rejected["global"],
            "rejected_draining_total": self.rejected["draining"],
            "stale_detected_total": self.stale_detected.total,
            "stale_active": self.stale_active,
            "slow_consumer_total": self.slow_consumers.total,
            "new_per_s": round(self.rate.rate(time.monotonic()), 3),
            "closed_total": self.closed.by_label(),
            "replayed_total": self.replayed.total,
            "resets_total": self.resets.total,
            "subscribed_total": self.subscriptions["subscribed"],
            "unsubscribed_total": self.subscriptions["unsubscribed"],
            "watermark": self.feeds.watermark if self.feeds is not None else 0,
            "feeds": len(self.feeds.feeds) if self.feeds is not None else 0,
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
