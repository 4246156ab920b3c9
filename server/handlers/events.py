"""The SSE streams: ``GET /api/v1/channels/{id}/events`` (one channel) and
``GET /api/v1/events`` (several, or every channel the caller is a member of).

Order matters: auth (middleware), input, visibility (404), then limits and registration
in one step, then the response starts. Until registration nothing is held; after it,
every exit path (client gone, error, cancellation, shutdown) unregisters the stream.

Memory per idle stream is the figure that limits a process (docs/sse.md), so the
handler does not stay suspended for the stream's life: it sets the stream up (ready,
replay, live) and returns the response. aiohttp then calls the response's
``write_eof``, which is where the stream waits for its end; the middlewares' and the
handler's frames (and the request's query scope) are freed. A stream that went live
then takes its connection over (``hand_over``, server/protocol.py): aiohttp forgets the
connection and frees its request, response, parser and tasks, and the stream lives on
its transport alone, under ``StreamConnection``; the manager ends it (server/sse/).
A stream closed before it went live ends through aiohttp as any response does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from server.clientip import client_ip
from server.keys import CHANNELS, MESSAGES, SETTINGS, STREAMS
from server.middlewares import current_credential, current_user
from server.params import path_id
from server.protocol import HandedOver, hand_over
from server.sse import frames
from server.sse.cursor import Cursor
from server.sse.manager import StreamManager
from server.sse.replay import parse_last_event_id, parse_resume, replay, replay_many
from server.sse.stream import CHOSEN, CLOSING, MEMBERSHIP, ONE, Stream
from shared.errors import NotFound, RetryLater, ValidationError
from shared.validation import parse_id

logger = logging.getLogger(__name__)


_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


def set_tcp_user_timeout(request: web.BaseRequest, stream: Stream | None) -> None:
    """Ask the kernel to abort the connection when written data stays unacknowledged
    for HERALD_SSE_STALE_S (Linux): a hung peer is dropped by the kernel too, not only
    by the sweep. aiohttp-sse does this in a private method of its response; one
    setsockopt here keeps Herald on its public API. Streams are never kept alive for
    another request, so nothing is restored afterwards."""
    if _TCP_USER_TIMEOUT is None or stream is None or request.transport is None:
        return
    sock = request.transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    assert isinstance(request, web.Request)
    stale_ms = int(request.app[SETTINGS].sse_stale_s * 1000)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, max(1, stale_ms))


class EventStream(EventSourceResponse):
    """aiohttp-sse's response (its SSE headers) without its per-connection ping task:
    one process-wide sweep sends heartbeats, and frames are encoded once and written
    to every subscriber's transport.

    It holds its registered stream from the handler's return until the stream ends:
    aiohttp's ``write_eof`` call (right after the handler returns, with no await in
    between) waits for the end and unregisters the stream on every exit path."""

    def __init__(self, stream: Stream, manager: StreamManager) -> None:
        super().__init__()
        # One stream per connection: the connection ends with the stream.
        del self.headers["Connection"]
        self.force_close()
        self._stream: Stream | None = stream
        self._manager = manager
        self._protocol: Any = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return self._payload_writer
        set_tcp_user_timeout(request, self._stream)
        self._protocol = request.protocol
        writer = await web.StreamResponse.prepare(self, request)
        # The headers are serialised by now; the multidict (about 1 KB with its keys
        # and values) would otherwise live as long as the stream.
        self.headers.clear()
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        stream, self._stream = self._stream, None
        protocol, self._protocol = self._protocol, None
        if stream is not None and self.hand_over(stream, protocol):
            return  # the body goes on; aiohttp writes nothing more
        if stream is not None:
            try:
                await stream.done
                await finish(stream, self, self._manager)
            except ConnectionError:
                pass  # the client went away mid-write: nothing left to answer
            except Exception:
                logger.exception("SSE %s failed", stream.id)
                stream.abort()
            finally:
                self.release(stream)
        await super().write_eof(data)

    def hand_over(self, stream: Stream, protocol: Any) -> bool:
        """A live stream takes its connection from aiohttp (see the module docstring)."""
        if stream.close_reason is not None or protocol is None:
            return False
        if hand_over(protocol, StreamConnection(stream, self._manager)) is None:
            return False
        stream.detach()
        return True

    def end_setup_failed(self) -> None:
        """The handler did not hand the stream over: forget it now."""
        stream, self._stream = self._stream, None
        if stream is not None:
            self.release(stream)

    def release(self, stream: Stream) -> None:
        self._manager.unregister(stream)
        logger.debug("SSE %s ended: %s", stream.id, stream.close_reason or "gone")


class StreamConnection(HandedOver):
    """A live stream's connection once aiohttp let it go: the peer sends nothing that
    matters (more than READ_LIMIT bytes ends the stream), and its end is the stream's."""

    __slots__ = ("manager", "received", "stream")
    READ_LIMIT = 65536

    def __init__(self, stream: Stream, manager: StreamManager) -> None:
        super().__init__()
        self.stream = stream
        self.manager = manager
        self.received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.READ_LIMIT:
            self.stream.abort()

    def lost(self, exc: BaseException | None) -> None:
        self.manager.gone(self.stream)
        logger.debug("SSE %s ended: %s", self.stream.id, self.stream.close_reason or "gone")


# How often a stream closed as stale or slow checks whether its close event left.
FLUSH_POLL_S = 0.05


async def channel_events(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/channels/{id}/events``: one channel; ``id:`` is the message id."""
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    after_id = parse_last_event_id(request)
    app = request.app
    manager = app[STREAMS]
    while True:
        since = time.monotonic()
        await app[CHANNELS].get(user, channel_id)  # 404 unless the caller may see it
        # A revoke that went by during the check found no stream of ours to close, and
        # the check may have read the state before it: check again.
        if not manager.revoked_since(channel_id, user.id, since):
            break
    ip = client_ip(request, app[SETTINGS].trusted_proxies)
    cred = current_credential(request)
    stream = await manager.admit(
        channel_id=channel_id,
        user_id=user.id,
        ip=ip,
        transport=request.transport,
        token_id=cred.token_id,
        token_expires_at=cred.expires_at,
    )
    logger.debug("SSE %s opened: channel %d user %d", stream.id, channel_id, user.id)
    return await run_stream(request, stream, after_id=after_id)


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/events``: several channels on one stream (``?channels=``), or every
    channel the caller is a member of, kept current; ``id:`` is a cursor."""
    user = current_user(request)
    app = request.app
    settings, manager = app[SETTINGS], app[STREAMS]
    resume = parse_resume(request, manager.cursor_key)
    chosen = "channels" in request.query
    wanted = channel_list(request, settings.sse_max_channels) if chosen else []
    while True:
        since = time.monotonic()
        if chosen:
            if await app[CHANNELS].visible_ids(user, wanted) != set(wanted):
                # One answer for any id the caller cannot see, naming none.
                raise NotFound("channel not found", code="channel_not_found")
            followed = set(wanted)
        else:
            followed = set(await app[CHANNELS].member_ids(user))
        if not any(manager.revoked_since(c, user.id, since) for c in followed):
            break
    if not chosen:
        followed |= {c for c, _ in manager.joined_since(user.id, since)}
    if resume is not None:  # checked above; now read against the stream's own list
        resume = parse_resume(request, manager.cursor_key, followed)
    ip = client_ip(request, settings.trusted_proxies)
    cred = current_credential(request)
    stream = await manager.admit(
        channels=followed,
        kind=CHOSEN if chosen else MEMBERSHIP,
        user_id=user.id,
        ip=ip,
        transport=request.transport,
        token_id=cred.token_id,
        token_expires_at=cred.expires_at,
    )
    logger.debug("SSE %s opened: %d channels, user %d", stream.id, len(followed), user.id)
    return await run_stream(request, stream, resume=resume)


def channel_list(request: web.Request, maximum: int) -> list[int]:
    """``?channels=1,2,3``: 1 to ``maximum`` distinct ids (duplicates collapse)."""
    raw = request.query.get("channels", "")
    if len(raw) > 24 * maximum:
        raise ValidationError(f"channels: at most {maximum} channel ids")
    parts = [p.strip() for p in raw.split(",")]
    if not raw.strip() or any(not p for p in parts):
        raise ValidationError("channels: a comma-separated list of channel ids")
    ids = sorted({parse_id(p, "channels") for p in parts})
    if len(ids) > maximum:
        raise ValidationError(f"channels: at most {maximum} channel ids")
    return ids


async def run_stream(
    request: web.Request,
    stream: Stream,
    *,
    after_id: int | None = None,
    resume: Cursor | None = None,
) -> web.StreamResponse:
    """Set a registered stream up (feeds ready, ready event, replay) and hand it over."""
    app = request.app
    settings, manager = app[SETTINGS], app[STREAMS]
    feeds = manager.feeds
    response = EventStream(stream, manager)
    handed_over = False
    try:
        if feeds is not None and not await feeds.wait_ready(
            stream.channels, settings.backend_timeout_s
        ):
            raise RetryLater(
                "the message store does not answer; reconnect shortly",
                code="service_unavailable",
                status=503,
                retry_after=2,
            )
        # From here the feeds' writes for this stream are buffered; the replay covers
        # up to these heads (no await since the buffer started to matter).
        heads = {
            c: (f.head or 0) if feeds is not None and (f := feeds.feeds.get(c)) else 0
            for c in stream.channels
        }
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        else:
            stream.chunked = False  # HTTP/1.0: the body ends when the connection does
        stream.writer = await response.prepare(request)
        manager.note_write(stream)
        if stream.kind == ONE:
            ready = frames.ready(stream.id, stream.channel_id, settings.sse_heartbeat_s)
        else:
            ready = frames.ready_multi(stream.id, sorted(heads), settings.sse_heartbeat_s)
        await response.write(ready)
        stream.events_sent += 1
        manager.count_sent("ready")
        messages = app[MESSAGES]
        if stream.kind == ONE:
            head = heads[stream.channel_id]
            if after_id is None:
                stream.sent_id = head
            else:
                await replay(stream, response, messages, manager, after_id, head)
        elif resume is None:
            # A channel whose head the watermark passed needs no entry (cursor.py).
            assert stream.positions is not None
            watermark = feeds.watermark if feeds is not None else 0
            stream.positions.update((c, h) for c, h in heads.items() if h > watermark)
        else:
            await replay_many(stream, response, messages, manager, resume, heads)
        manager.go_live(stream)
        handed_over = True  # from here the response's write_eof waits and cleans up
    except ConnectionError:
        pass  # the client went away mid-write: nothing left to answer
    except Exception:
        if not response.prepared:
            raise  # nothing sent yet: the error middleware answers
        # Headers are out, so no error answer is possible: drop the connection; the
        # client reconnects with Last-Event-ID and loses nothing.
        logger.exception("SSE %s failed", stream.id)
        stream.abort()
    finally:
        if not handed_over:
            response.end_setup_failed()
    return response


async def finish(stream: Stream, response: web.StreamResponse, manager: StreamManager) -> None:
    """End the response after a close: the ``close`` event (if SETUP did not let the
    manager write it), the end of the body, and for a reader that stopped reading, a
    bounded wait for it to take that before the connection is dropped."""
    stream.flush()  # anything still queued goes before aiohttp writes again
    if stream.close_reason is None or stream.is_gone():
        return  # the peer is gone
    if stream.state != CLOSING:
        stream.state = CLOSING
        await response.write(manager.close_frame(stream).raw)
    await response.write_eof()
    if stream.close_reason in ("stale", "slow_consumer"):
        await flush_or_drop(stream)


async def flush_or_drop(stream: Stream) -> None:
    while not stream.is_gone() and stream.transport is not None:
        if stream.transport.get_write_buffer_size() == 0:
            return
        if time.monotonic() >= stream.closing_deadline:
            stream.abort()
            return
        await asyncio.sleep(FLUSH_POLL_S)
