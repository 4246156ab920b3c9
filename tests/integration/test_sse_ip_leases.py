"""HERALD_SSE_MAX_PER_IP counts an address's streams on every server process that
shares the Redis (leases, server/sse/leases.py); with Redis away each counts alone."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from server.keys import STREAMS
from server.sse.leases import LEASE_TTL_S, IpLeases
from shared.constants import sse_ip_key
from shared.metrics import Metrics
from tests.helpers import API, make_channel, wait_for


async def test_per_ip_limit_spans_two_processes(client, make_client, alice, redis):
    other = await make_client(sse_max_per_ip=2)
    first = await make_client(sse_max_per_ip=2)
    channel_id = await make_channel(first, alice)
    url = f"{API}/channels/{channel_id}/events"
    a = await first.get(url, headers=alice.headers)
    b = await other.get(f"{API}/events?channels={channel_id}", headers=alice.headers)
    assert (a.status, b.status) == (200, 200)
    # Each process holds one stream of 127.0.0.1: the third is refused on either.
    for app_client in (first, other):
        refused = await app_client.get(url, headers=alice.headers)
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "too_many_connections"
        assert refused.headers["Retry-After"] == "5"
    assert await redis.zcard(sse_ip_key("127.0.0.1")) == 2
    # A lease runs out within LEASE_TTL_S: a killed process frees its slots by itself.
    scores = [s for _, s in await redis.zrange(sse_ip_key("127.0.0.1"), 0, -1, withscores=True)]
    assert all(time.time() < s <= time.time() + LEASE_TTL_S + 1 for s in scores)
    # A stream that ends gives its slot back to every process.
    a.close()
    await wait_for(lambda: not first.app[STREAMS].streams, 3)
    deadline = time.monotonic() + 3
    while await redis.zcard(sse_ip_key("127.0.0.1")) != 1:
        assert time.monotonic() < deadline, "the lease was not given back"
        await asyncio.sleep(0.01)
    again = await first.get(url, headers=alice.headers)
    assert again.status == 200
    again.close()
    b.close()


async def test_leases_fail_open_per_process_when_redis_does_not_answer(settings):
    dead: Any = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    metrics = Metrics()
    leases = IpLeases(
        redis=dead, settings=replace(settings, backend_timeout_s=0.5), metrics=metrics
    )
    try:
        assert await leases.take("10.0.0.1", "s1") is True
        assert await leases.take("10.0.0.1", "s2") is True  # no Redis round trip now
    finally:
        await dead.aclose()
    assert metrics.sse_ip_leases_unavailable._value.get() == 2


async def test_renewal_refreshes_every_lease_and_restores_lost_ones(settings, redis):
    leases = IpLeases(redis=redis, settings=settings, metrics=Metrics())
    # Enough streams for several scripts, across addresses of both families.
    holders = [(f"10.9.{i // 250}.{i % 250}", [f"s{i}a", f"s{i}b"]) for i in range(1500)]
    holders.append(("2001:db8::7", ["v6"]))
    keys = [sse_ip_key(ip) for ip, _ in holders]
    try:
        await redis.zadd(keys[0], {"s0a": 1.0})  # an old lease, about to run out
        before = time.time()
        await leases._renew(lambda: holders)
        for key, (_, ids) in zip(
            [*keys[::300], keys[-1]], [*holders[::300], holders[-1]], strict=True
        ):
            got = dict(await redis.zrange(key, 0, -1, withscores=True))
            assert sorted(got) == sorted(i.encode() for i in ids)
            assert all(
                before + LEASE_TTL_S - 1 < s <= time.time() + LEASE_TTL_S for s in got.values()
            )
            assert 0 < await redis.ttl(key) <= int(LEASE_TTL_S) + 5
        # Redis restarted empty: the next pass brings every lease back.
        await redis.delete(*keys)
        await leases._renew(lambda: holders)
        assert sum([await redis.zcard(k) for k in keys]) == 3001
    finally:
        await redis.delete(*keys)
