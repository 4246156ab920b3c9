"""``GET /api/v1/channels/{id}/events``: the SSE stream of one channel."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from server.keys import CHANNELS, SETTINGS, STREAMS
from server.middlewares import current_user
from server.sse.frames import encode
from server.sse.manager import Stream
from shared.validation import parse_id

logger = logging.getLogger(__name__)

RETRY_MS = 3000


class HeraldEventSource(EventSourceResponse):
    """aiohttp-sse's response without its per-connection ping task: heartbeats are ours."""

    async def prepare(self, request: web.BaseRequest):  # type: ignore[no-untyped-def]
        if not self.prepared:
            writer = await web.StreamResponse.prepare(self, request)
            self.enable_chunked_encoding()
            return writer
        return self._payload_writer


def client_ip(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "unknown"


async def channel_events(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    channel_id = parse_id(request.match_info["channel_id"], "channel id")
    settings = request.app[SETTINGS]
    await request.app[CHANNELS].get(user, channel_id)  # 404 unless visible
    manager = request.app[STREAMS]
    stream = Stream(channel_id=channel_id, user_id=user.id, ip=client_ip(request))
    manager.register(stream)
    response = HeraldEventSource()
    try:
        await response.prepare(request)
        await response.write(
            encode(
                "ready",
                {
                    "connection_id": stream.id,
                    "channel_id": channel_id,
                    "heartbeat_s": settings.sse_heartbeat_s,
                },
                retry=RETRY_MS,
            )
        )
        while stream.close_reason is None:
            try:
                await asyncio.wait_for(stream.wake.wait(), settings.sse_heartbeat_s)
            except TimeoutError:
                stream.push(encode("heartbeat", {"ts": int(time.time())}))
            stream.wake.clear()
            while stream.pending:
                frame = stream.pending.popleft()
                stream.pending_bytes -= len(frame)
                await response.write(frame)
                stream.events_sent += 1
                stream.last_write_at = time.time()
        reconnect = RETRY_MS
        await response.write(
            encode(
                "close",
                {"reason": stream.close_reason, "reconnect_after_ms": reconnect},
                retry=reconnect,
            )
        )
        await response.write_eof()
        return response
    except ConnectionError:
        # The client went away mid-write: nothing left to answer.
        return response
    finally:
        manager.unregister(stream)
