"""``GET /api/v1/channels/{id}/events``: the SSE stream of one channel.

Order matters: auth (middleware), input, visibility (404), then limits and registration
in one step, then the response starts. Until registration nothing is held; after it,
every exit path (client gone, error, cancellation, shutdown) unregisters the stream.

Memory per idle stream is the figure that limits a process (docs/sse.md), so the
handler does not stay suspended for the stream's life: it sets the stream up (ready,
replay, live) and returns the response. aiohttp then calls the response's
``write_eof``, which is where the stream waits for its end; the middlewares' and the
handler's frames (and the request's query scope) are freed while it waits.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from server.clientip import client_ip
from server.keys import CHANNELS, MESSAGES, SETTINGS, STREAMS
from server.middlewares import current_user
from server.params import path_id
from server.sse import frames
from server.sse.manager import StreamManager
from server.sse.replay import parse_last_event_id, replay
from server.sse.stream import CLOSING, Stream

logger = logging.getLogger(__name__)


class EventStream(EventSourceResponse):
    """aiohttp-sse's response (its SSE headers and TCP_USER_TIMEOUT for hung peers)
    without its per-connection ping task: one process-wide sweep sends heartbeats, and
    frames are encoded once and written to every subscriber's transport.

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

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return self._payload_writer
        self._set_tcp_user_timeout(request)
        writer = await web.StreamResponse.prepare(self, request)
        # The headers are serialised by now; the multidict (about 1 KB with its keys
        # and values) would otherwise live as long as the stream.
        self.headers.clear()
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        stream, self._stream = self._stream, None
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

    def end_setup_failed(self) -> None:
        """The handler did not hand the stream over: forget it now."""
        stream, self._stream = self._stream, None
        if stream is not None:
            self.release(stream)

    def release(self, stream: Stream) -> None:
        self._manager.unregister(stream)
        logger.debug("SSE %s ended: %s", stream.id, stream.close_reason or "gone")


# How often a stream closed as stale or slow checks whether its close event left.
FLUSH_POLL_S = 0.05


async def channel_events(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    after_id = parse_last_event_id(request)
    app = request.app
    settings = app[SETTINGS]
    manager = app[STREAMS]
    while True:
        since = time.monotonic()
        await app[CHANNELS].get(user, channel_id)  # 404 unless the caller may see it
        # A revoke that went by during the check found no stream of ours to close, and
        # the check may have read the state before it: check again.
        if not manager.revoked_since(channel_id, user.id, since):
            break
    ip = client_ip(request, settings.trusted_proxies)
    stream = manager.open(
        channel_id=channel_id, user_id=user.id, ip=ip, transport=request.transport
    )
    logger.debug("SSE %s opened: channel %d user %d", stream.id, channel_id, user.id)
    response = EventStream(stream, manager)
    handed_over = False
    try:
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        else:
            stream.chunked = False  # HTTP/1.0: the body ends when the connection does
        stream.writer = await response.prepare(request)
        manager.note_write(stream)
        await response.write(frames.ready(stream.id, channel_id, settings.sse_heartbeat_s))
        stream.events_sent += 1
        manager.count_sent("ready")
        if after_id is not None:
            await replay(stream, response, app[MESSAGES], manager, after_id)
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
