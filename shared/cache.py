"""Channel metadata and token → user, cached in Redis so every process shares one copy.

Channel entries (``GET /channels/{id}``): one Redis hash per channel holding the
channel's JSON and, for a private channel, its member ids, so the visibility check needs
no database either. Entries live ``HERALD_CACHE_TTL_S`` seconds (0 turns caching off)
and every change drops them; because the cache is in Redis, a change made by any process
is seen by all. Correctness rests on two rules:

* **No stale write-back.** A loader reads the channel's generation counter *before* it
  reads PostgreSQL and stores its result only if the counter is unchanged (one Lua
  script); a writer bumps the counter and deletes the entry *after* its commit. So a
  loader that read the old state either stores before the delete (and is deleted) or
  finds the counter moved (and stores nothing).
* **One loader per key.** In a process, concurrent misses share one loading task; across
  processes, a short ``SET NX`` lock elects the loader and the others poll the entry.

Token → user entries make an authenticated request free of database work too. They are
keyed by the token's sha256 (never the token), live at most ``USER_TTL_MAX_S`` and never
past the token's own expiry. A revoked token must be refused everywhere within 2 s, so a
revoke deletes its entry after the commit, and because that delete can be lost (Redis
away at that moment; a loader that read the row just before the commit and stores just
after the delete), every server process deletes again, each second, the entries of every
token revoked within the last TTL and a margin (``UserService.sweep_revocations``): a
lost delete is made good within a second, and an entry stored before the revoke has
expired by itself before the window ends. Chosen over capping the TTL near 1 s, which
would cost a database read per active token per second and make "a cached token costs
no statement" hold only by timing. With Redis unreachable nothing is read from it, so
every request sees PostgreSQL's answer.

Redis trouble never fails a request: reads fall back to PostgreSQL and are counted.
Each command waits at most HERALD_BACKEND_TIMEOUT_S (the client's socket timeout), and
the first failure opens the process's Redis circuit breaker (shared/breaker.py): while
it is open the cache is skipped at once, so an outage costs one timeout, not one per
request. Failures are logged once per ``FAILURE_LOG_INTERVAL_S`` with a count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from shared.breaker import CircuitBreaker
from shared.constants import (
    channel_cache_key,
    channel_gen_key,
    channel_lock_key,
    user_token_cache_key,
)
from shared.logcontext import FAILURE_LOG_INTERVAL_S, Throttle
from shared.metrics import Metrics
from shared.models import Credential, User, may_see_channel
from shared.settings import Settings

logger = logging.getLogger(__name__)

# The short TTL bounds how long a user removed by hand in SQL keeps working; revoked
# tokens are dropped within a second (see the docstring).
USER_TTL_MAX_S = 60
LOCK_TTL_S = 5.0
POLL_FIRST_S = 0.005
POLL_MAX_S = 0.05
INVALIDATE_ATTEMPTS = 3

# KEYS[1] entry hash, KEYS[2] generation; ARGV[1] generation read before loading ("" if
# none), ARGV[2] TTL, ARGV[3..] field/value pairs. HSET in slices: Lua's unpack() has a
# stack limit, and a large private channel has many member fields.
STORE_LUA = """
local gen = redis.call('GET', KEYS[2]) or ''
if gen ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
DATA_FIELD = "d"
ABSENT = ""  # the "d" value of a channel that does not exist


def member_field(user_id: int) -> str:
    return f"m:{user_id}"


@dataclass(frozen=True, slots=True)
class ChannelEntry:
    """What the cache knows about one channel id."""

    channel: dict[str, Any] | None  # the API's JSON (with member_count); None: no channel
    members: frozenset[int] = frozenset()  # filled for private channels only

    def visible_to(self, user: User) -> dict[str, Any] | None:
        """The channel JSON if ``user`` may see it, else None (missing and hidden alike)."""
        channel = self.channel
        if channel is None or not may_see_channel(
            user, is_private=channel["is_private"], is_member=user.id in self.members
        ):
            return None
        return channel

    def fields(self) -> list[str]:
        if self.channel is None:
            return [DATA_FIELD, ABSENT]
        out = [DATA_FIELD, json.dumps(self.channel, separators=(",", ":"))]
        for user_id in self.members:
            out += [member_field(user_id), "1"]
        return out

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> ChannelEntry | None:
        data = raw.get(DATA_FIELD.encode())
        if data is None:
            return None
        if data == ABSENT.encode():
            return cls(None)
        members = frozenset(int(k[2:]) for k in raw if k.startswith(b"m:") and k[2:].isdigit())
        return cls(json.loads(data), members)


ChannelLoader = Callable[[], Awaitable[ChannelEntry]]


class MetadataCache:
    """The Redis cache for channel details and token → user lookups."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        settings: Settings,
        metrics: Metrics,
        lock_ttl_s: float = LOCK_TTL_S,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.redis = redis
        self.breaker = breaker or CircuitBreaker("redis")
        self._throttle = Throttle(FAILURE_LOG_INTERVAL_S)
        self.metrics = metrics
        self.ttl_s = settings.cache_ttl_s
        self.user_ttl_s = min(settings.cache_ttl_s, USER_TTL_MAX_S)
        self.lock_ttl_s = lock_ttl_s
        # The generation must outlive any load in flight; past that its value is moot.
        self.gen_ttl_s = 2 * self.ttl_s + 60
        self._store = redis.register_script(STORE_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        # channel id -> (its load in flight, the generation read before it began)
        self._inflight: dict[int, tuple[asyncio.Task[ChannelEntry], bytes | None]] = {}
        # This process's counts, as /health shows them (Prometheus has the same).
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "channel_hits",
                "channel_misses",
                "channel_invalidations",
                "user_hits",
                "user_misses",
                "errors",
                "bypassed",
            ),
            0,
        )

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def _hit(self, kind: str) -> None:
        self.counts[f"{kind}_hits"] += 1
        self.metrics.cache_hits.labels(kind).inc()

    def _miss(self, kind: str) -> None:
        self.counts[f"{kind}_misses"] += 1
        self.metrics.cache_misses.labels(kind).inc()

    def _usable(self) -> bool:
        """False while the Redis breaker is open: the caller goes to PostgreSQL at once."""
        if self.breaker.allow():
            return True
        self.counts["bypassed"] += 1
        return False

    def _ok(self) -> None:
        if self.breaker.success():
            logger.info("cache: Redis answers again")

    def _error(self, op: str, exc: Exception) -> None:
        self.counts["errors"] += 1
        self.metrics.cache_errors.labels(op).inc()
        self.breaker.failure()
        left_out = self._throttle.allow("error")
        if left_out is not None:
            logger.warning(
                "cache %s failed (%s); using the database (%d more cache failures not"
                " logged since the last line)",
                op,
                exc.__class__.__name__,
                left_out,
            )

    # -- channels ----------------------------------------------------------------------
    async def channel_for(
        self, channel_id: int, user: User, load: ChannelLoader
    ) -> dict[str, Any] | None:
        """The channel's JSON if it exists and ``user`` may see it, else None. A hit costs
        one Redis round trip; a miss runs ``load`` once per key across all processes."""
        if not self.enabled or not self._usable():
            return (await load()).visible_to(user)
        try:
            data, member = await cast(
                Awaitable[list[bytes | None]],
                self.redis.hmget(
                    channel_cache_key(channel_id), [DATA_FIELD, member_field(user.id)]
                ),
            )
        except RedisError as exc:
            self._error("read", exc)
            return (await load()).visible_to(user)
        self._ok()
        if data is not None:
            self._hit("channel")
            if data == ABSENT.encode():
                return None
            channel: dict[str, Any] = json.loads(data)
            if not may_see_channel(
                user, is_private=channel["is_private"], is_member=member is not None
            ):
                return None
            return channel
        self._miss("channel")
        return (await self._single_flight(channel_id, load)).visible_to(user)

    async def _single_flight(self, channel_id: int, load: ChannelLoader) -> ChannelEntry:
        # Join a load only if no change was invalidated since it began (same generation):
        # a load that may have read the rows before a member's removal must not answer
        # a request that started after the removal returned.
        try:
            gen = await self.redis.get(channel_gen_key(channel_id))
        except RedisError as exc:
            self._error("read", exc)
            return await load()
        flight = self._inflight.get(channel_id)
        if flight is None or flight[1] != gen:
            task = asyncio.create_task(self._fill(channel_id, load))
            flight = (task, gen)
            self._inflight[channel_id] = flight
            task.add_done_callback(lambda t: self._done(channel_id, t))
        # shield: a caller that goes away must not cancel the load the others wait for.
        return await asyncio.shield(flight[0])

    def _done(self, channel_id: int, task: asyncio.Task[ChannelEntry]) -> None:
        flight = self._inflight.get(channel_id)
        if flight is not None and flight[0] is task:
            del self._inflight[channel_id]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have left already

    async def _fill(self, channel_id: int, load: ChannelLoader) -> ChannelEntry:
        key, lock = channel_cache_key(channel_id), channel_lock_key(channel_id)
        token = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_ttl_s
        pause = POLL_FIRST_S
        waited = False
        try:
            while True:
                if await self.redis.set(lock, token, nx=True, px=int(self.lock_ttl_s * 1000)):
                    try:
                        return await self._load_and_store(channel_id, load)
                    finally:
                        await self._unlock(lock, token)
                if not waited:
                    waited = True
                    self.metrics.cache_lock_waits.inc()
                await asyncio.sleep(pause)
                pause = min(pause * 2, POLL_MAX_S)
                raw = await cast(Awaitable[dict[bytes, bytes]], self.redis.hgetall(key))
                entry = ChannelEntry.from_hash(raw)
                if entry is not None:
                    return entry
                if loop.time() >= deadline:
                    # The loader elsewhere is stuck or gone; its lock is about to expire.
                    return await load()
        except RedisError as exc:
            self._error("fill", exc)
            return await load()

    async def _load_and_store(self, channel_id: int, load: ChannelLoader) -> ChannelEntry:
        key, gen_key = channel_cache_key(channel_id), channel_gen_key(channel_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.get(gen_key)
            raw, gen = await pipe.execute()
        # Another process may have stored it between our miss and our lock.
        entry = ChannelEntry.from_hash(raw)
        if entry is not None:
            return entry
        entry = await load()
        try:
            await self._store(
                keys=[key, gen_key],
                args=[(gen or b"").decode(), self.ttl_s, *entry.fields()],
            )
        except RedisError as exc:
            self._error("store", exc)
        return entry

    async def _unlock(self, lock: str, token: str) -> None:
        try:
            await self._release(keys=[lock], args=[token])
        except RedisError as exc:
            self._error("unlock", exc)  # it expires by itself within LOCK_TTL_S

    async def invalidate_channel(self, channel_id: int) -> None:
        """Drop the channel's entry; call after the change committed (any process)."""
        gen_key = channel_gen_key(channel_id)
        for attempt in range(INVALIDATE_ATTEMPTS):
            if not self.breaker.allow():
                # Redis is down (or was a moment ago): no attempt would be answered in
                # time. A frozen Redis that comes back may serve the old entry.
                self._invalidation_lost(channel_id, "Redis unavailable")
                return
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.incr(gen_key)
                    pipe.expire(gen_key, self.gen_ttl_s)
                    pipe.delete(channel_cache_key(channel_id))
                    await pipe.execute()
            except RedisError as exc:
                if isinstance(exc, RedisTimeout) or attempt + 1 == INVALIDATE_ATTEMPTS:
                    # A timeout already cost HERALD_BACKEND_TIMEOUT_S: no second wait.
                    self.breaker.failure()
                    self._invalidation_lost(channel_id, exc.__class__.__name__)
                    return
                await asyncio.sleep(0.05 * (attempt + 1))
            else:
                self._ok()
                self.counts["channel_invalidations"] += 1
                self.metrics.cache_invalidations.labels("channel").inc()
                return

    def _invalidation_lost(self, channel_id: int, why: str) -> None:
        # The entry may now be stale for up to the TTL: an error, not a warning.
        self.counts["errors"] += 1
        self.metrics.cache_errors.labels("invalidate").inc()
        left_out = self._throttle.allow("invalidate")
        if left_out is not None:
            logger.error(
                "cache invalidation of channel %d failed (%s; %d more not logged since the"
                " last line); its entry may be stale for up to HERALD_CACHE_TTL_S",
                channel_id,
                why,
                left_out,
            )

    # -- token → user ------------------------------------------------------------------
    async def credential_for(self, token_hash: bytes) -> Credential | None:
        """The cached credential of a token's sha256, or None (miss, caching off, or the
        token expired since it was stored)."""
        if not self.enabled or not self._usable():
            return None
        try:
            raw = await self.redis.get(user_token_cache_key(token_hash.hex()))
        except RedisError as exc:
            self._error("read", exc)
            return None
        self._ok()
        if raw is None:
            self._miss("user")
            return None
        data = json.loads(raw)
        expires = data.get("exp")
        cred = Credential(
            User(int(data["id"]), str(data["name"]), bool(data["is_admin"])),
            int(data["tok"]),
            None if expires is None else float(expires),
        )
        if cred.expired(time.time()):
            self._miss("user")
            return None
        self._hit("user")
        return cred

    async def remember_credential(self, token_hash: bytes, cred: Credential) -> None:
        """Cache a successful token lookup (by the token's sha256) for ``user_ttl_s``,
        or until the token expires if that is sooner."""
        if not self.enabled or not self._usable():
            return
        ttl_ms = int(self.user_ttl_s * 1000)
        if cred.expires_at is not None:
            ttl_ms = min(ttl_ms, int((cred.expires_at - time.time()) * 1000))
        if ttl_ms <= 0:
            return
        entry = {**cred.user.to_json(), "tok": cred.token_id, "exp": cred.expires_at}
        try:
            await self.redis.set(
                user_token_cache_key(token_hash.hex()),
                json.dumps(entry, separators=(",", ":")),
                px=ttl_ms,
            )
        except RedisError as exc:
            self._error("store", exc)

    async def forget_credentials(self, token_hashes: list[bytes]) -> bool:
        """Drop these tokens' entries (after their revoke committed); False if Redis
        failed (the servers' sweep deletes them again, see the docstring)."""
        if not token_hashes:
            return True
        try:
            await self.redis.delete(*(user_token_cache_key(h.hex()) for h in token_hashes))
        except RedisError as exc:
            self._error("invalidate", exc)
            return False
        self.metrics.cache_invalidations.labels("user").inc(len(token_hashes))
        return True

    def stats(self) -> dict[str, Any]:
        """This process's hit/miss/invalidation counts (for ``/health``)."""
        c = self.counts

        def ratio(hits: int, misses: int) -> float | None:
            return round(hits / (hits + misses), 4) if hits + misses else None

        return {
            "enabled": self.enabled,
            "ttl_s": self.ttl_s,
            "channel": {
                "hits": c["channel_hits"],
                "misses": c["channel_misses"],
                "invalidations": c["channel_invalidations"],
                "hit_ratio": ratio(c["channel_hits"], c["channel_misses"]),
            },
            "user": {
                "hits": c["user_hits"],
                "misses": c["user_misses"],
                "hit_ratio": ratio(c["user_hits"], c["user_misses"]),
            },
            "errors": c["errors"],
            "bypassed": c["bypassed"],
            "breaker": self.breaker.state,
        }
