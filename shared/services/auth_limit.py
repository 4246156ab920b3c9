"""Bad tokens per client address: more than HERALD_AUTH_FAIL_LIMIT within WINDOW_S and
every authenticated request from that address is refused (429) until the window passes.

A good token from a limited address is refused too: otherwise the throttle would still
answer "right" or "wrong" to each guess, and guessing would go on at full speed.
Cluster-wide through one Redis sorted set per address (scores: failure times); each
process also counts on its own, which is all there is while Redis does not answer
(each Redis call waits at most REDIS_WAIT_S, then Redis is skipped for SKIP_S, and
the process's Redis breaker, shared with the cache and the bus, is opened: a request
pays at most one Redis timeout in an outage, not one here and another in the cache).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque

import redis.asyncio as aioredis

from shared.breaker import CircuitBreaker
from shared.constants import KEY_PREFIX
from shared.metrics import Metrics

WINDOW_S = 60.0
REDIS_WAIT_S = 1.0
SKIP_S = 5.0
MAX_ADDRESSES = 10_000  # per-process memory bound; the oldest entries go first
REDIS_ERRORS = (OSError, asyncio.TimeoutError, aioredis.RedisError)


def failures_key(address: str) -> str:
    return f"{KEY_PREFIX}authfail:{address}"


class AuthFailureLimiter:
    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        limit: int,
        metrics: Metrics,
        breaker: CircuitBreaker | None = None,
        wait_s: float = REDIS_WAIT_S,
    ) -> None:
        self.redis = redis
        self.breaker = breaker or CircuitBreaker("redis")
        self.wait_s = min(wait_s, REDIS_WAIT_S)
        self.limit = limit
        self.metrics = metrics
        self.local: dict[str, deque[float]] = {}
        self._skip_until = 0.0

    def _local_times(self, address: str, now: float) -> deque[float]:
        times = self.local.get(address)
        if times is None:
            if len(self.local) >= MAX_ADDRESSES:
                self.local.pop(next(iter(self.local)))
            times = self.local[address] = deque()
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        return times

    def _retry_after(self, times: list[float], now: float) -> int | None:
        if len(times) < self.limit:
            return None
        oldest_that_counts = sorted(times)[len(times) - self.limit]
        return max(1, math.ceil(oldest_that_counts + WINDOW_S - now))

    async def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None when it is not limited."""
        now = time.time()
        local = self._retry_after(list(self._local_times(address, now)), now)
        if local is not None:
            return local
        if now < self._skip_until or not self.breaker.allow():
            return None
        try:
            async with asyncio.timeout(self.wait_s):
                key = failures_key(address)
                # Read-only: every request passes here, and a Redis that refuses writes
                # (full, paused) must not hold authentication; record_failure prunes.
                members = await self.redis.zrangebyscore(
                    key, now - WINDOW_S, "+inf", withscores=True
                )
        except REDIS_ERRORS:
            self._skip_until = now + SKIP_S
            self.breaker.failure()
            return None
        self.breaker.success()
        return self._retry_after([float(score) for _, score in members], now)

    async def record_failure(self, address: str) -> None:
        """One more bad token from ``address`` (counted in herald_auth_failures_total)."""
        now = time.time()
        self.metrics.auth_failures.inc()
        self._local_times(address, now).append(now)
        if now < self._skip_until or not self.breaker.allow():
            return
        try:
            async with asyncio.timeout(self.wait_s):
                key = failures_key(address)
                pipe = self.redis.pipeline(transaction=False)
                pipe.zremrangebyscore(key, "-inf", now - WINDOW_S)
                pipe.zadd(key, {f"{now}:{uuid.uuid4().hex[:8]}": now})
                pipe.expire(key, int(WINDOW_S) + 1)
                await pipe.execute()
        except REDIS_ERRORS:
            self._skip_until = now + SKIP_S
            self.breaker.failure()
