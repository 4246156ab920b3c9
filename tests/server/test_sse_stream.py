"""The stream as a client sees it: headers, ready, messages, heartbeats, errors, replay."""

from __future__ import annotations

import asyncio
import json
import time

from server.app import begin_draining
from server.keys import MESSAGES, SETTINGS, STREAMS
from server.sse import replay as replay_module
from tests.health_fields import CONTRACT_FIELDS
from tests.helpers import make_channel, wait_for
from tests.sse_helpers import SSEReader


async def post(client, user, channel_id, body) -> dict:
    resp = await client.post(
        f"/api/v1/channels/{channel_id}/messages", json={"body": body}, headers=user.headers
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_ready_first_with_headers(client, alice):
    channel_id = await make_channel(client, alice)
    resp = await client.get(f"/api/v1/channels/{channel_id}/events", headers=alice.headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    reader = SSEReader(resp.content)
    ready = await reader.next()
    assert ready.event == "ready" and ready.retry == 3000 and ready.id is None
    manager = client.app[STREAMS]
    assert ready.data == {
        "connection_id": next(iter(manager.streams)),
        "channel_id": channel_id,
        "heartbeat_s": 15.0,
    }
    assert reader.raw.startswith(b"retry: 3000\nevent: ready\ndata: {")
    resp.close()


async def test_messages_carry_ids_and_rest_shape(client, alice, bob):
    channel_id = await make_channel(client, alice)
    resp = await client.get(f"/api/v1/channels/{channel_id}/events?access_token={bob.token}")
    assert resp.status == 200
    reader = SSEReader(resp.content)
    await reader.until("ready")
    sent = [await post(client, alice, channel_id, f'hello {i} ✓ \n"quoted"') for i in range(3)]
    got = [await reader.until("message") for _ in sent]
    assert [e.id for e in got] == [m["id"] for m in sent]
    assert [e.data for e in got] == sent
    resp.close()


async def test_heartbeat_cadence(client, make_client, alice):
    channel_id = await make_channel(client, alice)
    fast = await make_client(sse_heartbeat_s=0.2)
    resp = await fast.get(f"/api/v1/channels/{channel_id}/events", headers=alice.headers)
    reader = SSEReader(resp.content)
    ready = await reader.until("ready")
    assert ready.data["heartbeat_s"] == 0.2
    start = time.monotonic()
    stamps = []
    for _ in range(5):
        beat = await reader.next(timeout=2)
        assert beat.event == "heartbeat" and beat.id is None
        assert abs(beat.data["ts"] - time.time()) <= 1
        stamps.append(time.monotonic() - start)
    gaps = [b - a for a, b in zip([0.0, *stamps], stamps, strict=False)]
    # One process-wide sweep every 20 ms: each beat within a tick of 200 ms (+ slack).
    assert all(0.12 <= g <= 0.4 for g in gaps), gaps
    resp.close()


async def test_bad_last_event_id_is_422_before_the_stream(client, alice):
    channel_id = await make_channel(client, alice)
    url = f"/api/v1/channels/{channel_id}/events"
    for bad in ["-1", "abc", "1.0", "9" * 25, str(2**63), "0x1", "\u0661", "1;DROP TABLE messages"]:
        resp = await client.get(url, headers={**alice.headers, "Last-Event-ID": bad})
        assert resp.status == 422, bad
        body = await resp.json()
        assert body["error"]["code"] == "validation_error"
        assert "Last-Event-ID" in body["error"]["message"]
        resp = await client.get(url, params={"last_event_id": bad}, headers=alice.headers)
        assert resp.status == 422, bad
    assert client.app[STREAMS].opened_total == 0


async def test_hostile_channel_ids_never_500(client, alice):
    for raw in ["0", "-1", "abc", "1%3BDROP", "%2e%2e%2f", "%00", "9" * 40, "%E2%9C%93", "1e5"]:
        resp = await client.get(f"/api/v1/channels/{raw}/events", headers=alice.headers)
        assert resp.status in (404, 422), (raw, resp.status)
        assert (await resp.json())["error"]["code"]
    resp = await client.get("/api/v1/channels/1/events")
    assert resp.status == 401
    resp = await client.get("/api/v1/channels/1/events?access_token=nope")
    assert resp.status == 401


async def test_replay_from_query_and_header_wins(client, alice):
    channel_id = await make_channel(client, alice)
    sent = [await post(client, alice, channel_id, f"m{i}") for i in range(5)]
    ids = [m["id"] for m in sent]
    url = f"/api/v1/channels/{channel_id}/events"
    resp = await client.get(url, params={"last_event_id": str(ids[1])}, headers=alice.headers)
    reader = SSEReader(resp.content)
    await reader.until("ready")
    got = [await reader.next() for _ in range(3)]
    assert [(e.event, e.id) for e in got] == [("message", i) for i in ids[2:]]
    assert [e.data for e in got] == sent[2:]
    resp.close()
    # Both present: the header (what the browser updates) wins over the URL's value.
    headers = {**alice.headers, "Last-Event-ID": str(ids[3])}
    resp = await client.get(url, params={"last_event_id": str(ids[0])}, headers=headers)
    reader = SSEReader(resp.content)
    await reader.until("ready")
    assert (await reader.next()).id == ids[4]
    live = await post(client, alice, channel_id, "live")
    assert (await reader.next()).id == live["id"]
    resp.close()


async def test_more_than_1000_missed_gives_reset_then_live(client, alice, db):
    channel_id = await make_channel(client, alice)
    await db.execute(
        "INSERT INTO messages (channel_id, author_id, body)"
        " SELECT %s, %s, 'm' || g FROM generate_series(1, 1001) g",
        (channel_id, alice.id),
    )
    newest = await db.fetchval("SELECT max(id) FROM messages")
    resp = await client.get(
        f"/api/v1/channels/{channel_id}/events", headers={**alice.headers, "Last-Event-ID": "0"}
    )
    reader = SSEReader(resp.content)
    await reader.until("ready")
    reset = await reader.next()
    assert (reset.event, reset.id, reset.data) == ("reset", newest, {"last_id": newest})
    live = await post(client, alice, channel_id, "after reset")
    nxt = await reader.next()
    assert (nxt.event, nxt.id) == ("message", live["id"])
    resp.close()
    # Exactly 1000 missed: replayed in full, no reset.
    resp = await client.get(
        f"/api/v1/channels/{channel_id}/events",
        headers={**alice.headers, "Last-Event-ID": str(live["id"] - 1000)},
    )
    reader = SSEReader(resp.content)
    await reader.until("ready")
    got = [await reader.next() for _ in range(1000)]
    assert [e.id for e in got] == list(range(live["id"] - 999, live["id"] + 1))
    resp.close()
    assert client.app[STREAMS].resets_total == 1


async def test_last_event_id_from_the_future_gives_reset(client, alice):
    channel_id = await make_channel(client, alice)
    m = await post(client, alice, channel_id, "only")
    resp = await client.get(
        f"/api/v1/channels/{channel_id}/events",
        headers={**alice.headers, "Last-Event-ID": str(m["id"] + 500)},
    )
    reader = SSEReader(resp.content)
    await reader.until("ready")
    reset = await reader.next()
    assert (reset.event, reset.data) == ("reset", {"last_id": m["id"]})
    resp.close()


async def test_admin_connections(client, alice, admin):
    channel_id = await make_channel(client, alice)
    other = await make_channel(client, alice, "other")
    resp = await client.get("/api/v1/admin/connections", headers=alice.headers)
    assert resp.status == 403
    assert (await client.get("/api/v1/admin/connections")).status == 401
    s1 = await client.get(f"/api/v1/channels/{channel_id}/events", headers=alice.headers)
    s2 = await client.get(f"/api/v1/channels/{other}/events", headers=admin.headers)
    for s in (s1, s2):
        await SSEReader(s.content).until("ready")
    resp = await client.get("/api/v1/admin/connections", headers=admin.headers)
    body = await resp.json()
    assert resp.status == 200 and body["total"] == 2
    item = body["items"][0]
    assert {"id", "ip", "channel_id", "user_id", "connected_at", "last_write_at"} <= set(item)
    assert (item["ip"], item["channel_id"], item["user_id"]) == ("127.0.0.1", channel_id, alice.id)
    assert item["connected_at"].endswith("Z")
    resp = await client.get(
        "/api/v1/admin/connections", params={"channel_id": str(other)}, headers=admin.headers
    )
    assert [i["user_id"] for i in (await resp.json())["items"]] == [admin.id]
    resp = await client.get("/api/v1/admin/connections?limit=1", headers=admin.headers)
    assert len((await resp.json())["items"]) == 1
    for bad in [
        "limit=0",
        "limit=10001",
        "limit=x",
        "channel_id=-1",
        "channel_id=%00",
        "channel_id=1%27%3B--",
        "limit=" + "9" * 30,
    ]:
        resp = await client.get(f"/api/v1/admin/connections?{bad}", headers=admin.headers)
        assert resp.status == 422, bad
    s1.close()
    s2.close()


async def test_health_and_metrics_figures(client, alice):
    channel_id = await make_channel(client, alice)
    s = await client.get(f"/api/v1/channels/{channel_id}/events", headers=alice.headers)
    await SSEReader(s.content).until("ready")
    body = await (await client.get("/health")).json()
    sse = body["sse"]
    assert CONTRACT_FIELDS["sse"] <= set(sse)
    assert sse["limits"] == {"per_ip": 5, "global": 1000}
    assert (sse["active"], sse["peak"], sse["opened_total"]) == (1, 1, 1)
    assert sse["new_per_s"] == 0.1  # one in the 10-second window
    assert "127.0.0.1" not in json.dumps(body)
    text = await (await client.get("/metrics")).text()
    for name in (
        "herald_sse_active 1.0",
        "herald_sse_peak 1.0",
        "herald_sse_opened_total 1.0",
        "herald_sse_stale_active 0.0",
        'herald_sse_events_sent_total{event="ready"} 1.0',
    ):
        assert name in text, name
    s.close()


async def test_draining_refuses_streams_and_health_says_so(client, alice):
    channel_id = await make_channel(client, alice)
    begin_draining(client.app)
    resp = await client.get("/health")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "down" and body["draining"] is True
    resp = await client.get(f"/api/v1/channels/{channel_id}/events", headers=alice.headers)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "shutting_down"
    assert int(resp.headers["Retry-After"]) >= 1
    # Plain REST still answers while draining.
    resp = await client.get(f"/api/v1/channels/{channel_id}", headers=alice.headers)
    assert resp.status == 200


async def test_stream_carries_cors_headers_for_allowed_origin(client, make_client, alice):
    channel_id = await make_channel(client, alice)
    app = await make_client(cors_origins=frozenset({"http://app.example"}))
    resp = await app.get(
        f"/api/v1/channels/{channel_id}/events?access_token={alice.token}",
        headers={"Origin": "http://app.example"},
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
    resp.close()
    resp = await app.get(
        f"/api/v1/channels/{channel_id}/events?access_token={alice.token}",
        headers={"Origin": "http://evil.example"},
    )
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp.close()


async def test_concurrent_opens_respect_the_limit_exactly(client, make_client, alice):
    channel_id = await make_channel(client, alice)
    small = await make_client(sse_max_per_ip=3)
    url = f"/api/v1/channels/{channel_id}/events"
    resps = await asyncio.gather(*(small.get(url, headers=alice.headers) for _ in range(12)))
    statuses = sorted(r.status for r in resps)
    assert statuses == [200] * 3 + [429] * 9
    manager = small.app[STREAMS]
    assert len(manager.streams) == 3 and manager.rejected["per_ip"] == 9
    for r in resps:
        r.close()
    await wait_for(lambda: not manager.streams, 3)


async def test_replay_reads_in_pages_with_no_gap_or_duplicate(client, alice, db, monkeypatch):
    """Replay holds at most REPLAY_PAGE messages at a time and still sends each once."""
    monkeypatch.setattr(replay_module, "REPLAY_PAGE", 7)
    channel_id = await make_channel(client, alice)
    await db.execute(
        "INSERT INTO messages (channel_id, author_id, body)"
        " SELECT %s, %s, 'm' || g FROM generate_series(1, 50) g",
        (channel_id, alice.id),
    )
    first = await db.fetchval("SELECT min(id) FROM messages WHERE channel_id = %s", (channel_id,))
    messages = client.app[MESSAGES]
    calls: list[int] = []
    real_between = messages.between

    async def counting_between(spans, after, limit):
        rows = await real_between(spans, after, limit)
        calls.append(len(rows))
        return rows

    monkeypatch.setattr(messages, "between", counting_between)
    resp = await client.get(
        f"/api/v1/channels/{channel_id}/events",
        headers={**alice.headers, "Last-Event-ID": str(first + 2)},
    )
    reader = SSEReader(resp.content)
    await reader.until("ready")
    got = [await reader.next() for _ in range(47)]
    assert [e.id for e in got] == list(range(first + 3, first + 50))
    assert max(calls) <= 7 and len(calls) == 7  # 47 rows in pages of 7
    resp.close()


async def test_stream_socket_has_tcp_user_timeout_of_the_stale_bound(client, alice):
    """The kernel, too, drops a peer that stops acknowledging (set with one setsockopt,
    no private aiohttp-sse API)."""
    import socket

    channel_id = await make_channel(client, alice)
    resp = await client.get(f"/api/v1/channels/{channel_id}/events", headers=alice.headers)
    await SSEReader(resp.content).until("ready")
    (stream,) = client.app[STREAMS].streams.values()
    sock = stream.transport.get_extra_info("socket")
    stale_ms = int(client.app[SETTINGS].sse_stale_s * 1000)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == stale_ms
    resp.close()
