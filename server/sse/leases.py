"""HERALD_SSE_MAX_PER_IP across every server process that shares the Redis.

Each open stream holds a lease in Redis: a member of its address's sorted set, scored
by when the lease runs out (``LEASE_TTL_S`` ahead). Each process renews its own streams'
leases every ``RENEW_S``, and drops a lease when its stream ends; a killed process's
leases simply run out, so its slots free within ``LEASE_TTL_S`` (30 s). Taking a lease
is one script (prune, count, add), so two processes cannot both take the last slot.

Redis is optional here: when it does not answer within HERALD_BACKEND_TIMEOUT_S, or
failed in the last ``BACKOFF_S``, the request is let through and counted
(``herald_sse_ip_leases_unavailable_total``); each process's own per-IP count
(manager.py) still applies, so an outage only loosens the limit to per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis

from shared.constants import sse_ip_key
from shared.metrics import Metrics
from shared.settings import Settings
from shared.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

LEASE_TTL_S = 30.0
RENEW_S = 10.0
BACKOFF_S = 5.0

# KEYS[1] the address's set; ARGV: now, limit, lease expiry, stream id, key TTL.
TAKE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# One renewal pass, in one script per RENEW_BATCH streams. ARGV: lease expiry, key TTL,
# then the leases as one string: a line per address, "key<TAB>id,id,...". One string
# rather than a ZADD per address with a member mapping: at 10,000 streams redis-py
# spent about 8 us per lease building and packing the commands (13 % of an idle
# server's busy samples); a join costs a fraction of that. Keys and ids hold no TAB,
# comma or newline (shared/constants.py's prefix, an address, hex stream ids).
RENEW_LUA = r"""
for line in string.gmatch(ARGV[3], "[^\n]+") do
  local key, ids = string.match(line, "^([^\t]+)\t(.*)$")
  for id in string.gmatch(ids, "[^,]+") do redis.call('ZADD', key, ARGV[1], id) end
  redis.call('EXPIRE', key, ARGV[2])
end
return 1
"""
RENEW_BATCH = 2000

# What the renewal reads: (address, stream ids) of this process's open streams.
Holders = Callable[[], Iterable[tuple[str, Iterable[str]]]]


class IpLeases:
    def __init__(self, *, redis: aioredis.Redis, settings: Settings, metrics: Metrics) -> None:
        self.redis = redis
        self.limit = settings.sse_max_per_ip
        self.timeout_s = settings.backend_timeout_s
        self.metrics = metrics
        self._take = redis.register_script(TAKE_LUA)
        self._renew_script = redis.register_script(RENEW_LUA)
        self._failed_at = -BACKOFF_S
        self._released: list[tuple[str, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._down_logged = False

    def _usable(self) -> bool:
        return time.monotonic() - self._failed_at >= BACKOFF_S

    def _failed(self, exc: BaseException) -> None:
        self._failed_at = time.monotonic()
        if not self._down_logged:
            logger.warning(
                "SSE per-IP leases: Redis does not answer (%s); counting per process",
                exc.__class__.__name__,
            )
            self._down_logged = True

    async def take(self, ip: str, stream_id: str) -> bool:
        """Take a slot for ``ip``; False if every slot is held (on any process). True
        without Redis (counted) while it does not answer."""
        if not self._usable():
            self.metrics.sse_ip_leases_unavailable.inc()
            return True
        now = time.time()
        try:
            async with asyncio.timeout(self.timeout_s):
                got = await self._take(
                    keys=[sse_ip_key(ip)],
                    args=[now, self.limit, now + LEASE_TTL_S, stream_id, int(LEASE_TTL_S) + 5],
                )
        except (TimeoutError, OSError, aioredis.RedisError) as exc:
            self._failed(exc)
            self.metrics.sse_ip_leases_unavailable.inc()
            return True
        if self._down_logged:
            logger.info("SSE per-IP leases: Redis answers again")
            self._down_logged = False
        return bool(got)

    def release(self, ip: str, stream_id: str) -> None:
        """The stream ended: its lease goes with the next renewal pass (soon)."""
        self._released.append((ip, stream_id))
        self._wake.set()

    def start(self, holders: Holders) -> None:
        self._task = asyncio.create_task(self._run(holders), name="herald-sse-leases")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        # Give back what this process held, so a restart does not wait out the TTL.
        with contextlib.suppress(Exception):
            await self._flush_releases()

    async def _run(self, holders: Holders) -> None:
        next_renew = time.monotonic() + RENEW_S
        me = asyncio.current_task()
        while True:
            # A cancel that met the timeout's expiry comes out as TimeoutError (asyncio
            # in 3.11), so the suppress below would swallow stop()'s cancel: see it here.
            if me is not None and me.cancelling():
                raise asyncio.CancelledError
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_renew - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush_releases()
                if time.monotonic() >= next_renew:
                    next_renew = time.monotonic() + RENEW_S
                    await self._renew(holders)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)

    async def _flush_releases(self) -> None:
        if not self._released or not self._usable():
            return
        released, self._released = self._released, []
        async with asyncio.timeout(self.timeout_s):
            pipe = self.redis.pipeline(transaction=False)
            for ip, stream_id in released:
                pipe.zrem(sse_ip_key(ip), stream_id)
            await pipe.execute()

    async def _renew(self, holders: Holders) -> None:
        if not self._usable():
            return
        args: list[float | int] = [time.time() + LEASE_TTL_S, int(LEASE_TTL_S) + 5]
        async with asyncio.timeout(self.timeout_s):
            # Also re-adds leases lost to a Redis restart: the count comes back.
            for payload in renewal_payloads(holders()):
                await self._renew_script(args=[*args, payload])


def renewal_payloads(holders: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """The leases as RENEW_LUA takes them, about RENEW_BATCH streams per string."""
    payloads: list[str] = []
    lines: list[str] = []
    count = 0
    for ip, ids in holders:
        members = list(ids)
        if not members:
            continue
        lines.append(f"{sse_ip_key(ip)}\t{','.join(members)}")
        count += len(members)
        if count >= RENEW_BATCH:
            payloads.append("\n".join(lines))
            lines, count = [], 0
    if lines:
        payloads.append("\n".join(lines))
    return payloads
