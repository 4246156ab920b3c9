"""A live stream takes its connection over from aiohttp (server/protocol.py's
``hand_over``): aiohttp's objects for it are freed, the stream keeps working on its
bare transport, every way it ends still ends it, and the connection cap still counts it."""

from __future__ import annotations

import asyncio
import gc

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from server.protocol import HeraldWebServer
from tests.helpers import wait_for
from tests.sse_helpers import SSEReader, auth, live_server


def alive(*types: type) -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, types)]


def web_server(live) -> HeraldWebServer:
    server = live.server.runner.server
    assert isinstance(server, HeraldWebServer)
    return server


async def open_handed_over(live) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client's per-channel stream, once the stream holds its connection."""
    user, token = await live.user("alice")
    channel_id = await live.channel(user)
    reader, writer = await asyncio.open_connection("127.0.0.1", live.server.port)
    writer.write(
        f"GET /api/v1/channels/{channel_id}/events HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    await wait_for(lambda: web_server(live).handed_over == 1, 2, "the hand-over")
    return reader, writer


async def test_live_stream_frees_aiohttps_objects_and_keeps_working(settings):
    async with live_server(settings, sse_heartbeat_s=0.3) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        async with aiohttp.ClientSession() as session:
            resp = await session.get(live.events_url(channel_id), headers=auth(token))
            reader = SSEReader(resp.content)
            await reader.until("ready")
            await wait_for(lambda: web_server(live).handed_over == 1, 2, "the hand-over")
            (stream,) = live.manager.streams.values()
            assert stream.detached and stream.writer is None
            # aiohttp no longer holds the connection: its handler and request are gone.
            await wait_for(
                lambda: not alive(RequestHandler, web.BaseRequest), 2, "aiohttp to let go"
            )
            assert web_server(live).open_connections == 1
            posted = await live.post(user, channel_id, "after the hand-over")
            ev = await reader.until("message")
            assert ev.id == posted["id"] and ev.data["body"] == "after the hand-over"
            await reader.until("heartbeat", timeout=2)
            # Caught up and handed over: the tick no longer looks at it, the wheel holds it.
            await wait_for(lambda: not live.manager.watched, 2, "the stream to be unwatched")
            assert any(stream in slot for slot in live.manager.wheel.slots.values())
            resp.close()
            await wait_for(lambda: not live.manager.streams, 2, "the stream to leave")
            assert web_server(live).handed_over == 0
            assert live.manager.closed["gone"] == 1
            assert stream not in live.manager.watched
            assert all(stream not in slot for slot in live.manager.wheel.slots.values())


async def test_server_close_ends_the_body_and_the_connection(settings):
    async with live_server(settings, sse_heartbeat_s=5) as live:
        reader, writer = await open_handed_over(live)
        (stream,) = live.manager.streams.values()
        live.manager.close(stream, "revoked")
        async with asyncio.timeout(3):
            raw = await reader.read()  # to EOF: the server closed the connection
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200")
        assert b'event: close\ndata: {"reason":"revoked"' in raw
        assert raw.endswith(b"\r\n0\r\n\r\n")  # the chunked body's end, then EOF
        await wait_for(lambda: not live.manager.streams, 2, "the stream to leave")
        assert live.manager.closed["revoked"] == 1 and web_server(live).handed_over == 0


async def test_a_peer_that_sends_too_much_is_dropped(settings):
    async with live_server(settings, sse_heartbeat_s=5) as live:
        _, writer = await open_handed_over(live)
        # A few pipelined bytes are ignored; past the limit the connection is dropped.
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0)
        assert len(live.manager.streams) == 1
        try:
            for _ in range(40):
                writer.write(b"x" * 4096)
                await writer.drain()
        except ConnectionError:
            pass
        await wait_for(lambda: not live.manager.streams, 3, "the stream to be dropped")
        assert web_server(live).handed_over == 0
        writer.close()


async def test_handed_over_streams_count_against_the_connection_cap(settings):
    async with live_server(settings, sse_heartbeat_s=5) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        async with aiohttp.ClientSession() as session:
            streams = []
            for _ in range(3):
                resp = await session.get(live.events_url(channel_id), headers=auth(token))
                await SSEReader(resp.content).until("ready")
                streams.append(resp)
            await wait_for(lambda: web_server(live).handed_over == 3, 2, "the hand-overs")
            server = web_server(live)
            server.cap = server.open_connections  # full: the next connection is refused
            async with session.get(f"{live.url}/health") as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "server_busy"
            for resp in streams:
                resp.close()
            await wait_for(lambda: server.handed_over == 0, 2, "the streams to end")
