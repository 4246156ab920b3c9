"""One open SSE stream: its metadata, its state and the primitives that write to it.

Writes go straight to the connection's transport (``transport.write`` never blocks), so
one fan-out loop or one heartbeat sweep serves every stream without waking a task per
connection. Frames that reach one stream in the same turn of the event loop leave in one
write (``Outbox``): under load a busy stream costs one syscall per turn, not one per
event; an idle server writes each event at the end of the turn that made it. The
stream's handler task only sets the stream up (ready, replay), then sleeps on ``done``
until someone closes the stream.

States: ``SETUP`` (registered, handler writing ready/replay; live events are buffered),
``LIVE`` (events written as they come), ``CLOSING`` (close event written, waiting for
the handler to end the response). A stream leaves the registry when its handler ends.
"""

from __future__ import annotations

import asyncio
import fcntl
import secrets
import struct
import sys
import termios
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from server.sse.frames import Frame, MessageFrames

# What a feed writes at once to one channel's streams: (message id, its frames), in order.
Batch = list[tuple[int, MessageFrames]]

SETUP, LIVE, CLOSING = 0, 1, 2
# What a stream follows: one channel (GET /channels/{id}/events), the channels asked
# for (GET /events?channels=…), or the caller's memberships, kept current (GET /events).
ONE, CHOSEN, MEMBERSHIP = 0, 1, 2
STATE_NAMES = {SETUP: "setup", LIVE: "live", CLOSING: "closing"}

# Outcomes of Stream.send.
WRITTEN, GONE, FULL = 0, 1, 2

_OUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None
_INT = struct.Struct("i")


def kernel_pending(fd: int) -> int:
    """Bytes the kernel still holds for this socket: unsent plus sent-but-unacknowledged
    (SIOCOUTQ). A dead peer or a client that stopped reading shows here long before the
    transport's own buffer grows, since the kernel buffer absorbs megabytes first."""
    if _OUTQ is None or fd < 0:
        return 0
    try:
        out: bytes = fcntl.ioctl(fd, _OUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(_INT.unpack(out)[0])


def new_stream_id() -> str:
    return secrets.token_hex(8)


# Streams written per turn of the event loop. Between two such slices the loop serves
# other sockets (posts' PostgreSQL and Redis replies, the bus): a fan-out to 10,000
# streams never stalls a post's round trip for its whole length, and what the bus brings
# meanwhile joins the queue of every stream not yet written, in the same write.
FLUSH_SLICE = 128
# Writes an idle outbox makes at once (see Outbox): enough for the first subscribers of
# a fan-out, few enough that under load nearly everything still shares passes.
DIRECT_WRITES = 16


class Outbox:
    """Streams with queued frames, oldest first. One callback, scheduled by the first of
    them, writes each stream's frames in one ``write``, FLUSH_SLICE streams per turn:
    frames that reach a stream before its turn comes leave with it. Under load a busy
    stream costs one syscall per pass, not one per event.

    While nothing is queued, the first ``direct`` writes go out at once instead (the
    first slice of a fan-out does not wait for the whole loop over its streams to be
    queued); the budget comes back when a pass of slices has emptied the queue.

    ``watched`` holds the streams the manager's sweep looks at on every tick: those with
    a write not yet known to be delivered (``dirty``), those closing, and those aiohttp
    still holds (a handed-over stream's end reaches the manager by itself). An idle
    stream is in none of these and costs the sweep nothing until its heartbeat."""

    __slots__ = ("direct", "scheduled", "streams", "watched")

    def __init__(self, direct: int = DIRECT_WRITES) -> None:
        self.streams: deque[Stream] = deque()
        self.scheduled = False
        self.direct = direct
        self.watched: set[Stream] = set()

    def take_direct(self) -> bool:
        """May a stream with nothing queued write now?"""
        if self.scheduled or self.direct <= 0:
            return False
        self.direct -= 1
        return True

    def add(self, stream: Stream) -> None:
        self.streams.append(stream)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.write_slice)

    def write_slice(self) -> None:
        streams = self.streams
        try:
            for _ in range(min(len(streams), FLUSH_SLICE)):
                streams.popleft().flush()
        finally:
            self.scheduled = bool(streams)
            if streams:
                asyncio.get_running_loop().call_soon(self.write_slice)
            else:
                self.direct = DIRECT_WRITES

    def flush(self) -> None:
        """Write every queued stream now (tests; the slices do it otherwise)."""
        streams = self.streams
        while streams:
            streams.popleft().flush()


class Stream:
    """Slots only: at 10,000 streams every byte per stream counts."""

    __slots__ = (
        "buffer",
        "buffered_bytes",
        "bytes_direct",
        "catching_up",
        "channel_id",
        "channels",
        "chunked",
        "close_reason",
        "closing_deadline",
        "connected_at",
        "delivered",
        "detached",
        "dirty",
        "done",
        "events_sent",
        "fd",
        "id",
        "ip",
        "kind",
        "last_write_at",
        "next_heartbeat",
        "outbox",
        "positions",
        "queued",
        "queued_bytes",
        "reconnect_after_ms",
        "sent_id",
        "stale",
        "state",
        "token_expires_at",
        "token_id",
        "transport",
        "user_id",
        "writer",
    )

    def __init__(
        self,
        *,
        channels: Iterable[int],
        user_id: int,
        ip: str,
        transport: asyncio.Transport | None,
        outbox: Outbox,
        kind: int = ONE,
        now: float | None = None,
        stream_id: str | None = None,
        token_id: int = 0,
        token_expires_at: float | None = None,
    ) -> None:
        self.id = stream_id or new_stream_id()
        self.kind = kind
        # What it follows, in id order: a tuple, since a set of 20 channels costs 2.2 KB
        # per stream against 0.2 (membership tests on it are rare: setup, joins, leaves).
        self.channels: tuple[int, ...] = tuple(sorted(set(channels)))
        # The one channel of a per-channel stream (0 for the others).
        self.channel_id = self.channels[0] if kind == ONE else 0
        self.user_id = user_id
        # The token that opened it (server/sse/tokens.py ends the stream with the token),
        # and when that token expires (unix seconds; None: never).
        self.token_id = token_id
        self.token_expires_at = token_expires_at
        self.ip = ip
        self.transport = transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        self.fd: int = sock.fileno() if sock is not None else -1
        now = time.monotonic() if now is None else now
        self.connected_at = time.time()
        # Monotonic: when a write was last known complete (or when the first write the
        # peer has not yet taken was made). Stale = dirty and this older than stale_s.
        self.last_write_at = now
        self.next_heartbeat = now
        self.state = SETUP
        self.close_reason: str | None = None
        self.reconnect_after_ms = 0
        self.closing_deadline = 0.0
        self.stale = False
        self.chunked = True
        self.writer: Any = None  # aiohttp's payload writer: its output_size counts its bytes
        self.bytes_direct = 0
        # Handed over (server/protocol.py): the stream alone holds its connection now.
        self.detached = False
        # Frames written in this turn of the loop, not yet handed to the transport.
        self.outbox = outbox
        self.queued: list[bytes] | None = None
        self.queued_bytes = 0
        self.delivered = 0
        self.dirty = False
        self.events_sent = 0
        # What the feeds write during SETUP, per channel, for go_live (which skips what
        # the replay already sent).
        self.buffer: list[tuple[int, Batch]] | None = []
        self.buffered_bytes = 0
        # Per-channel stream: the last message id it has (written, or the client's).
        self.sent_id = 0
        # Multi-channel stream: channel -> last id it has, for channels whose position
        # is not the process's watermark (see cursor.py); pruned as the watermark passes.
        self.positions: dict[int, int] | None = None if kind == ONE else {}
        # Channels added while live, still being replayed: what the feed writes for them
        # meanwhile waits here.
        self.catching_up: dict[int, list[Batch]] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def send(self, frame: Frame, now: float, limit: int, *, direct: bool = False) -> int:
        """Write one frame now: WRITTEN, GONE (the peer left) or FULL (more than
        ``limit`` bytes would wait in our buffer: a slow consumer)."""
        data = frame.chunked if self.chunked else frame.raw
        return self.send_bytes(data, now, limit, direct=direct)

    def send_bytes(
        self, data: bytes, now: float, limit: int, events: int = 1, *, direct: bool = False
    ) -> int:
        """Write bytes already framed for this stream (chunked or raw): queued for the
        end of this turn of the loop, with whatever else reaches the stream in it, or
        with ``direct`` (a heartbeat: nothing else comes in its turn) written at once
        unless something is queued already."""
        t = self.transport
        if t is None or t.is_closing():
            return GONE
        # What waits in our own queue is our delay, not the peer's: only the
        # transport's backlog (the peer not taking what it was sent) makes it slow.
        if t.get_write_buffer_size() + len(data) > limit:
            return FULL
        if not self.dirty:
            self.start_clock(now)
        queued = self.queued
        if queued is not None:
            queued.append(data)
            self.queued_bytes += len(data)
        elif direct or self.outbox.take_direct():
            t.write(data)
        else:
            self.queued = [data]
            self.queued_bytes += len(data)
            self.outbox.add(self)
        self.bytes_direct += len(data)
        self.events_sent += events
        return WRITTEN

    def flush(self) -> None:
        """Hand what this turn queued to the transport, in one write."""
        queued = self.queued
        if queued is None:
            return
        self.queued = None
        self.queued_bytes = 0
        t = self.transport
        if t is None or t.is_closing():
            return  # the peer left; the sweep or the handler ends the stream
        t.write(queued[0] if len(queued) == 1 else b"".join(queued))

    def frame_bytes(self, raw: bytes) -> bytes:
        """``raw`` SSE bytes as this stream sends them (one chunk, or as is on HTTP/1.0)."""
        return b"%x\r\n%b\r\n" % (len(raw), raw) if self.chunked else raw

    def start_clock(self, now: float) -> None:
        """Called before the first write since the peer was last seen caught up: all
        bytes so far are delivered; the stale clock runs from this write."""
        self.dirty = True
        self.last_write_at = now
        self.delivered = self.written_total()
        self.outbox.watched.add(self)

    def force_write(self, frame: Frame) -> bool:
        """Write now, after what is queued, regardless of the buffer bound (the small
        ``close`` frame)."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        self.flush()
        data = frame.chunked if self.chunked else frame.raw
        t.write(data)
        self.bytes_direct += len(data)
        self.events_sent += 1
        return True

    def detach(self) -> None:
        """aiohttp let the connection go: its writer's count becomes ours."""
        if self.writer is not None:
            self.bytes_direct += int(self.writer.output_size)
            self.writer = None
        self.detached = True

    def end_body(self) -> None:
        """A detached stream's end after its ``close`` frame: the body's last chunk, and
        the connection closes as soon as our buffer is empty (``close_if_flushed``; the
        sweep drops it at ``closing_deadline`` otherwise)."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self.flush()
        if self.chunked:
            t.write(b"0\r\n\r\n")
        self.close_if_flushed()

    def close_if_flushed(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.get_write_buffer_size() == 0:
            t.close()

    def written_total(self) -> int:
        """Bytes handed to the transport so far, by aiohttp's writer and by us."""
        writer_bytes = self.writer.output_size if self.writer is not None else 0
        return int(writer_bytes) + self.bytes_direct

    def pending(self) -> int:
        """Bytes not yet taken by the peer: queued, in our transport buffer and in the
        kernel's."""
        t = self.transport
        if t is None:
            return 0
        return self.queued_bytes + t.get_write_buffer_size() + kernel_pending(self.fd)

    def is_gone(self) -> bool:
        t = self.transport
        return t is None or t.is_closing()

    def wake(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        """Drop the connection without a word (nothing more can be written)."""
        if self.transport is not None:
            self.transport.abort()
        self.wake()

    def info(self, now_mono: float, now_wall: float) -> dict[str, Any]:
        last_write_wall = now_wall - (now_mono - self.last_write_at)
        return {
            "id": self.id,
            "ip": self.ip,
            "channel_id": self.channel_id if self.kind == ONE else None,
            "channels": sorted(self.channels),
            "user_id": self.user_id,
            "connected_at": _iso(self.connected_at),
            "last_write_at": _iso(last_write_wall),
            "events_sent": self.events_sent,
            "state": "stale" if self.stale else STATE_NAMES[self.state],
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
