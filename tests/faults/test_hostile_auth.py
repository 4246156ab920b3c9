"""HERALD_AUTH_FAIL_LIMIT: the 21st bad token from one address → 429 with Retry-After."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import aiohttp
import redis.asyncio as aioredis

from server.keys import AUTH_LIMIT, METRICS
from server.runner import HeraldServer
from tests.sse_helpers import live_server

LIMIT = 20


async def test_auth_fail_limit_per_address_and_cluster_wide(settings, make_user):
    user = await make_user("alice")
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    async with (
        live_server(settings, trusted_proxies=trusted) as live,
        aiohttp.ClientSession() as session,
    ):
        url = live.url + "/api/v1/me"
        bad = {"Authorization": "Bearer nope", "X-Forwarded-For": "203.0.113.7"}
        statuses = []
        for _ in range(LIMIT):
            async with session.get(url, headers=bad) as resp:
                statuses.append(resp.status)
        assert statuses == [401] * LIMIT
        async with session.get(url, headers=bad) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["code"] == "too_many_auth_failures"
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
        # A good token from the limited address is refused too (documented decision).
        async with session.get(
            url, headers={**user.headers, "X-Forwarded-For": "203.0.113.7"}
        ) as resp:
            assert resp.status == 429
        # Another address is unaffected.
        async with session.get(
            url, headers={**user.headers, "X-Forwarded-For": "203.0.113.8"}
        ) as resp:
            assert resp.status == 200
        metrics = live.server.app[METRICS].render().decode()
        assert "herald_auth_failures_total 20.0" in metrics
        assert "herald_auth_throttled_total 2.0" in metrics
        # Another server process sharing the Redis refuses the address too.
        other = HeraldServer(replace(settings, trusted_proxies=trusted))
        await other.start("127.0.0.1", 0)
        try:
            async with session.get(
                f"http://127.0.0.1:{other.port}/api/v1/me",
                headers={**user.headers, "X-Forwarded-For": "203.0.113.7"},
            ) as resp:
                assert resp.status == 429
        finally:
            await other.stop()


async def test_auth_fail_limit_counts_per_process_when_redis_does_not_answer(settings, make_user):
    async with live_server(settings) as live, aiohttp.ClientSession() as session:
        limiter = live.server.app[AUTH_LIMIT]
        dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
        limiter.redis = dead
        try:
            url = live.url + "/api/v1/me"
            for _ in range(LIMIT):
                async with session.get(url, headers={"Authorization": "Bearer x"}) as resp:
                    assert resp.status == 401
            async with session.get(url, headers={"Authorization": "Bearer x"}) as resp:
                assert resp.status == 429
        finally:
            await dead.aclose()
