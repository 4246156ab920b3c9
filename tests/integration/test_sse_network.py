"""SSE over real sockets: limits per loopback address, forwarded-for spoofing, stale and
slow readers, replay racing live posts, revocation across two server instances."""

from __future__ import annotations

import asyncio
import socket
from contextlib import AsyncExitStack

import aiohttp

from server.keys import CHANNELS, STREAMS
from tests.helpers import make_channel, wait_for
from tests.sse_helpers import SSEReader, auth, live_server, raw_stream


def session_from(ip: str) -> aiohttp.ClientSession:
    """A client whose connections leave from ``ip`` (any of 127.0.0.0/8 works)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0)))


async def open_stream(session, url, token, **headers):
    resp = await session.get(url, headers={**auth(token), **headers})
    if resp.status == 200:
        await SSEReader(resp.content).until("ready")
    return resp


async def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def test_per_ip_and_global_limits_across_loopback_addresses(settings):
    async with live_server(
        settings, sse_max_per_ip=2, sse_max_connections=5, sse_heartbeat_s=0.5
    ) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        url = live.events_url(channel_id)
        async with AsyncExitStack() as stack:
            sessions = {
                ip: await stack.enter_async_context(session_from(ip))
                for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4")
            }
            opened = []
            for ip in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.4"):
                resp = await open_stream(sessions[ip], url, token)
                assert resp.status == 200, ip
                opened.append(resp)
            over_ip = await open_stream(sessions["127.0.0.2"], url, token)
            assert over_ip.status == 429
            assert (await over_ip.json())["error"]["code"] == "server_busy"  # 5 of 5 used
            opened.pop().close()  # .4 leaves: one place free globally
            await wait_for(lambda: len(live.manager.streams) == 4, 3)
            over_ip = await open_stream(sessions["127.0.0.2"], url, token)
            assert over_ip.status == 429
            assert (await over_ip.json())["error"]["code"] == "too_many_connections"
            assert over_ip.headers["Retry-After"] == "5"
            fresh = await open_stream(sessions["127.0.0.4"], url, token)
            assert fresh.status == 200
            opened.append(fresh)
            assert {ip: len(s) for ip, s in live.manager.by_ip.items()} == {
                "127.0.0.2": 2,
                "127.0.0.3": 2,
                "127.0.0.4": 1,
            }
            stats = live.manager.stats()
            assert (stats["rejected_per_ip_total"], stats["rejected_global_total"]) == (1, 1)
            for resp in opened:
                resp.close()
        await wait_for(lambda: not live.manager.streams, 3)


async def test_spoofed_forwarded_for_is_ignored_unless_from_a_trusted_proxy(settings):
    import ipaddress

    proxies = (ipaddress.ip_network("127.0.0.5/32"),)
    async with live_server(
        settings, sse_max_per_ip=1, trusted_proxies=proxies, sse_heartbeat_s=0.5
    ) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        url = live.events_url(channel_id)
        async with session_from("127.0.0.2") as spoofer, session_from("127.0.0.5") as proxy:
            first = await open_stream(spoofer, url, token, **{"X-Forwarded-For": "1.1.1.1"})
            assert first.status == 200
            # A new made-up address each time does not buy a new per-IP allowance.
            for fake in ("2.2.2.2", "127.0.0.5", "8.8.8.8, 127.0.0.5"):
                resp = await open_stream(spoofer, url, token, **{"X-Forwarded-For": fake})
                assert resp.status == 429, fake
            assert list(live.manager.by_ip) == ["127.0.0.2"]
            # Behind the trusted proxy, the rightmost address it did not add is the client.
            a = await open_stream(proxy, url, token, **{"X-Forwarded-For": "6.6.6.6, 9.9.9.9"})
            b = await open_stream(proxy, url, token, **{"X-Forwarded-For": "9.9.9.9"})
            c = await open_stream(proxy, url, token, **{"X-Forwarded-For": "6.6.6.6, 7.7.7.7"})
            assert (a.status, b.status, c.status) == (200, 429, 200)
            assert sorted(live.manager.by_ip) == ["127.0.0.2", "7.7.7.7", "9.9.9.9"]
            for resp in (first, a, c):
                resp.close()
        await wait_for(lambda: not live.manager.streams, 3)


async def test_stale_reader_is_detected_and_dropped(settings):
    async with live_server(settings, sse_heartbeat_s=0.05, sse_stale_s=0.5) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        path = f"/api/v1/channels/{channel_id}/events"
        sock = await raw_stream(live.server.port, path, token, "127.0.0.2", rcvbuf=1024)
        try:
            await wait_for(lambda: len(live.manager.streams) == 1, 3)
            stream = next(iter(live.manager.streams.values()))
            for i in range(4):  # fill the tiny window quickly
                await live.post(user, channel_id, f"{i}" * 8000)
            await wait_for(lambda: live.manager.stale_detected_total == 1, 5, "stale detection")
            assert stream.close_reason == "stale"
            await wait_for(lambda: not live.manager.streams, 5, "the stale stream to go")
            stats = live.manager.stats()
            assert stats["stale_active"] == 0 and stats["slow_consumer_total"] == 0
            assert live.manager.closed["stale"] == 1
            assert stream.transport.is_closing()
        finally:
            sock.close()


async def test_slow_consumer_gets_close_when_it_reads_again(settings):
    async with live_server(settings, sse_heartbeat_s=0.5, sse_buffer_bytes=16384) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        path = f"/api/v1/channels/{channel_id}/events"
        sock = await raw_stream(live.server.port, path, token, "127.0.0.3", rcvbuf=1024)
        try:
            await wait_for(lambda: len(live.manager.streams) == 1, 3)
            for i in range(8):
                await live.post(user, channel_id, f"{i}" * 5000)
            await wait_for(lambda: live.manager.slow_consumer_total == 1, 5, "slow consumer")
            data = await read_all(sock)  # reads again within the grace period
            assert b"event: ready" in data
            tail = data[data.rindex(b"event: close") :]
            assert b'"reason":"slow_consumer"' in tail
            assert data.endswith(b"0\r\n\r\n")  # the response was ended properly
            await wait_for(lambda: not live.manager.streams, 3)
            assert live.manager.stale_detected_total == 0
        finally:
            sock.close()


async def test_replay_has_no_gap_and_no_duplicate_while_messages_race_in(settings):
    async with live_server(settings) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        posted: list[int] = []
        done = asyncio.Event()

        async def poster() -> None:
            for i in range(150):
                posted.append((await live.post(user, channel_id, f"m{i}"))["id"])
                if i % 7 == 0:
                    await asyncio.sleep(0)
            done.set()

        received: list[int] = []
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(poster())
            # Reconnect again and again while the poster runs, each time from the last
            # id seen, reading a few events per connection.
            while not (done.is_set() and received and received[-1] == posted[-1]):
                headers = {"Last-Event-ID": str(received[-1] if received else 0)}
                resp = await open_stream(session, live.events_url(channel_id), token, **headers)
                reader = SSEReader(resp.content)
                for _ in range(9):
                    if done.is_set() and received and received[-1] == posted[-1]:
                        break
                    ev = await reader.until("message", timeout=5)
                    received.append(ev.id)
                resp.close()
            await task
        assert received == posted  # in order, each exactly once
        assert live.manager.replayed_total > 0


async def test_revocation_and_messages_across_two_instances(client, make_client, alice, bob):
    """Two apps on one Redis and database: two server processes."""
    channel_id = await make_channel(client, alice, "private", private=True)
    resp = await client.post(
        f"/api/v1/channels/{channel_id}/members", json={"user_id": bob.id}, headers=alice.headers
    )
    assert resp.status == 204
    other = await make_client()
    stream = await other.get(f"/api/v1/channels/{channel_id}/events", headers=bob.headers)
    reader = SSEReader(stream.content)
    await reader.until("ready")
    resp = await client.post(
        f"/api/v1/channels/{channel_id}/messages", json={"body": "hi"}, headers=alice.headers
    )
    sent = await resp.json()
    assert (await reader.until("message")).data == sent
    resp = await client.delete(
        f"/api/v1/channels/{channel_id}/members/{bob.id}", headers=alice.headers
    )
    assert resp.status == 204
    close = await reader.until("close")
    assert close.data["reason"] == "revoked"
    assert await reader.next() is None
    await wait_for(lambda: not other.app[STREAMS].streams, 3)
    assert other.app[STREAMS].closed["revoked"] == 1
    # And bob cannot come back to the private channel.
    again = await other.get(f"/api/v1/channels/{channel_id}/events", headers=bob.headers)
    assert again.status == 404
    assert client.app[CHANNELS] is not other.app[CHANNELS]
