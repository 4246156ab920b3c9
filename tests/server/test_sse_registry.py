"""Registry bookkeeping on every exit path: whatever ends a stream, it leaves the
registry, both indexes and every count. Run against the production runner (handlers
are not cancelled when a client leaves) unless the test says otherwise."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server.keys import CHANNELS, MESSAGES, STREAMS
from server.sse.manager import RECONNECT_MS
from tests.helpers import make_channel, wait_for
from tests.sse_helpers import SSEReader, auth, live_server


def assert_empty(manager) -> None:
    assert manager.streams == {}
    assert manager.by_channel == {}
    assert manager.by_ip == {}
    assert manager.stale_active == 0


async def open_stream(session, live, channel_id, token, **query):
    resp = await session.get(live.events_url(channel_id, **query), headers=auth(token))
    assert resp.status == 200, await resp.text()
    reader = SSEReader(resp.content)
    await reader.until("ready")
    return resp, reader


async def test_client_gone_leaves_registry(settings):
    async with live_server(settings, sse_heartbeat_s=0.5) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        async with aiohttp.ClientSession() as session:
            streams = [await open_stream(session, live, channel_id, token) for _ in range(3)]
            assert len(live.manager.streams) == 3
            assert len(live.manager.by_ip["127.0.0.1"]) == 3
            for resp, _ in streams:
                resp.close()
            await wait_for(lambda: not live.manager.streams, 3, "gone streams to leave")
        assert_empty(live.manager)
        assert live.manager.closed["gone"] == 3
        assert live.manager.stats()["active"] == 0
        assert live.manager.stats()["opened_total"] == 3


async def test_revoked_stream_gets_close_and_leaves(settings):
    async with live_server(settings, sse_heartbeat_s=0.5) as live:
        owner, _ = await live.user("owner")
        member, token = await live.user("member")
        _, admin_token = await live.user("admin", admin=True)
        channel_id = await live.channel(owner, private=True)
        channels = live.server.app[CHANNELS]
        await channels.add_member(owner, channel_id, member.id)
        async with aiohttp.ClientSession() as session:
            _, reader = await open_stream(session, live, channel_id, token)
            other, _ = await open_stream(session, live, channel_id, admin_token)
            await channels.remove_member(owner, channel_id, member.id)
            close = await reader.until("close")
            assert close.data["reason"] == "revoked"
            assert close.retry == close.data["reconnect_after_ms"]
            lo, hi = RECONNECT_MS["revoked"]
            assert lo <= close.retry <= hi
            assert await reader.next() is None  # the server ended the response
            # The admin's stream on the same channel is untouched.
            await wait_for(lambda: len(live.manager.streams) == 1, 3)
            other.close()
        await wait_for(lambda: not live.manager.streams, 3)
        assert_empty(live.manager)
        assert live.manager.closed["revoked"] == 1


async def test_error_after_headers_drops_connection_and_leaves(settings):
    async with live_server(settings, sse_heartbeat_s=0.5) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        messages = live.server.app[MESSAGES]

        async def broken_since(*args, **kwargs):
            raise RuntimeError("database fell over mid-replay")

        await messages.db.execute(
            "INSERT INTO messages (channel_id, author_id, body, prev_id) VALUES (%s, %s, 'x', 0)",
            (channel_id, user.id),
        )
        messages.since = broken_since  # type: ignore[method-assign]
        messages.count_since = broken_since  # type: ignore[method-assign]
        messages.count_between = broken_since  # type: ignore[method-assign]
        messages.between = broken_since  # type: ignore[method-assign]
        async with aiohttp.ClientSession() as session:
            headers = {**auth(token), "Last-Event-ID": "0"}
            async with session.get(live.events_url(channel_id), headers=headers) as resp:
                assert resp.status == 200
                reader = SSEReader(resp.content)
                assert (await reader.next()).event == "ready"
                with pytest.raises(aiohttp.ClientPayloadError):
                    await reader.next()  # dropped: no 500 page written into the stream
        await wait_for(lambda: not live.manager.streams, 3)
        assert_empty(live.manager)


async def test_cancelled_handler_leaves(client, alice):
    """aiohttp's test server cancels a handler when its client leaves."""
    channel_id = await make_channel(client, alice, "c")
    manager = client.app[STREAMS]
    resp = await client.get(f"/api/v1/channels/{channel_id}/events", headers=alice.headers)
    await SSEReader(resp.content).until("ready")
    assert len(manager.streams) == 1
    resp.close()
    await wait_for(lambda: not manager.streams, 3)
    assert_empty(manager)


async def test_shutdown_closes_every_stream_and_leaves(settings):
    live_cm = live_server(settings, shutdown_timeout_s=3)
    live = await live_cm.__aenter__()
    stopped = False
    try:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        async with aiohttp.ClientSession() as session:
            readers = [(await open_stream(session, live, channel_id, token))[1] for _ in range(4)]
            stop = asyncio.create_task(live.server.stop())
            closes = [await r.until("close") for r in readers]
            assert {c.data["reason"] for c in closes} == {"shutdown"}
            lo, hi = RECONNECT_MS["shutdown"]
            assert all(lo <= c.retry == c.data["reconnect_after_ms"] <= hi for c in closes)
            assert [await r.next() for r in readers] == [None] * 4
            await asyncio.wait_for(stop, 3)
            stopped = True
        assert_empty(live.manager)
        assert live.manager.closed["shutdown"] == 4
    finally:
        if not stopped:
            await live_cm.__aexit__(None, None, None)


async def test_refused_and_not_found_leave_nothing(client, alice, bob, make_client):
    secret = await make_channel(client, alice, "secret", private=True)
    manager = client.app[STREAMS]
    resp = await client.get(f"/api/v1/channels/{secret}/events", headers=bob.headers)
    assert resp.status == 404
    resp = await client.get(f"/api/v1/channels/{secret + 99}/events", headers=alice.headers)
    assert resp.status == 404
    assert_empty(manager)
    assert manager.opened_total == 0
    small = await make_client(sse_max_per_ip=1)
    first = await small.get(f"/api/v1/channels/{secret}/events", headers=alice.headers)
    await SSEReader(first.content).until("ready")
    second = await small.get(f"/api/v1/channels/{secret}/events", headers=alice.headers)
    assert second.status == 429
    assert (await second.json())["error"]["code"] == "too_many_connections"
    small_manager = small.app[STREAMS]
    assert len(small_manager.streams) == 1 and len(small_manager.by_ip["127.0.0.1"]) == 1
    first.close()
    await wait_for(lambda: not small_manager.streams, 3)
    assert_empty(small_manager)
