"""The Redis side both processes share: clients, the events on the bus, the arq pool.

Bus events are typed here, encoded by :meth:`EventBus.publish` and decoded once by
:func:`decode_event` at the subscriber's edge; everything past that edge is typed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from shared.breaker import CircuitBreaker
from shared.constants import events_channel
from shared.logcontext import FAILURE_LOG_INTERVAL_S, Throttle
from shared.models import MessageJson
from shared.settings import Settings

logger = logging.getLogger(__name__)


class MasterPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, logging when the master it connects to moves."""

    async def get_master_address(self) -> tuple[str, int]:
        before = self.master_address
        address: tuple[str, int] = await super().get_master_address()  # type: ignore[no-untyped-call]
        if before is not None and address != before:
            # Operators search for this line after a failover (docs/runbook.md).
            logger.warning(
                "Redis master %r is now %s:%s (Sentinel failover)",
                self.service_name,
                *address,
            )
        return address


def redis_client(settings: Settings) -> aioredis.Redis:
    """A client for keys and pub/sub; close it with :func:`close_redis`.

    Every command is bounded by HERALD_BACKEND_TIMEOUT_S (redis-py's connect timeout
    alone leaves a command to a frozen server waiting for ever). A pub/sub reader on
    this client must read with ``get_message(timeout=...)``, never ``listen()``: an idle
    blocking read would hit ``socket_timeout`` and look like a lost connection.

    With ``REDIS_SENTINELS`` every new connection asks the Sentinels for the master
    first, so after a failover each reconnect (the hub's among them) reaches the new
    one; ``REDIS_URL`` then gives only the database and the credentials."""
    timeout = settings.backend_timeout_s
    if settings.redis_sentinels:
        username, password = settings.redis_credentials
        # Sentinel takes the socket_* options for its own queries as well.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(settings.redis_sentinels),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        master: aioredis.Redis = sentinel.master_for(
            settings.redis_sentinel_master,
            connection_pool_class=MasterPool,
            db=settings.redis_db,
            username=username,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return master
    client: aioredis.Redis = aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    return client


def arq_settings(settings: Settings, *, conn_retries: int = 5) -> RedisSettings:
    # arq's connect timeout is whole seconds; its RedisSettings has no command timeout
    # (arq_pool sets that on the pool itself).
    if settings.redis_sentinels:
        username, password = settings.redis_credentials
        base = RedisSettings(
            host=list(settings.redis_sentinels),
            sentinel=True,
            sentinel_master=settings.redis_sentinel_master,
            database=settings.redis_db,
            username=username,
            password=password,
        )
    else:
        base = RedisSettings.from_dsn(settings.redis_url)
    base.conn_timeout = max(1, int(settings.backend_timeout_s))
    base.conn_retries = conn_retries
    return base


async def arq_pool(settings: Settings, *, conn_retries: int = 5) -> ArqRedis:
    """An arq pool whose commands are bounded like :func:`redis_client`'s. arq sends no
    blocking commands (it polls), so a command timeout never fires on an idle queue."""
    pool = await create_pool(arq_settings(settings, conn_retries=conn_retries))
    timeout = settings.backend_timeout_s
    pool.connection_pool.connection_kwargs.update(
        socket_timeout=timeout, socket_connect_timeout=timeout
    )
    # The connection create_pool pinged with was made before the timeouts: drop it, so
    # every connection from here on has them.
    await pool.connection_pool.disconnect()
    return pool


async def close_sentinels(client: aioredis.Redis | None) -> None:
    """Close the connections to the Sentinels a client asked for its master: redis-py's
    ``aclose()`` (and arq's ``Worker.close()``) leave them open."""
    pool = client.connection_pool if client is not None else None
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


async def close_redis(client: aioredis.Redis) -> None:
    """Close a client from the factories above (``redis_client``, ``arq_pool``)."""
    try:
        await client.aclose()
    finally:
        await close_sentinels(client)


@dataclass(frozen=True, slots=True)
class MessagePosted:
    """A message committed; ``prev_id`` is the channel's message before it (0: none,
    None: unknown), so a subscriber can tell a lost or overtaken event at once."""

    channel_id: int
    prev_id: int | None
    message: MessageJson


@dataclass(frozen=True, slots=True)
class MemberAdded:
    """``user_id`` joined; ``since`` is the channel's newest message id at the join."""

    channel_id: int
    user_id: int
    since: int


@dataclass(frozen=True, slots=True)
class MemberRemoved:
    channel_id: int
    user_id: int


@dataclass(frozen=True, slots=True)
class ChannelDeleted:
    channel_id: int


@dataclass(frozen=True, slots=True)
class TokenRevoked:
    """An API token was revoked: every process closes the streams it opened."""

    token_id: int
    user_id: int


ChannelEvent = MessagePosted | MemberAdded | MemberRemoved | ChannelDeleted
BusEvent = ChannelEvent | TokenRevoked

# The wire names of the events (kept from the first version: "revoke" is a removal).
TYPE_MESSAGE, TYPE_JOINED, TYPE_REVOKE, TYPE_DELETED, TYPE_TOKEN_REVOKED = (
    "message",
    "member_added",
    "revoke",
    "channel_deleted",
    "token_revoked",
)


def encode_event(event: BusEvent) -> dict[str, Any]:
    if isinstance(event, TokenRevoked):
        return {"type": TYPE_TOKEN_REVOKED, "token_id": event.token_id, "user_id": event.user_id}
    if isinstance(event, MessagePosted):
        return {
            "type": TYPE_MESSAGE,
            "channel_id": event.channel_id,
            "prev_id": event.prev_id,
            "message": event.message,
        }
    if isinstance(event, MemberAdded):
        return {
            "type": TYPE_JOINED,
            "channel_id": event.channel_id,
            "user_id": event.user_id,
            "since": event.since,
        }
    if isinstance(event, MemberRemoved):
        return {"type": TYPE_REVOKE, "channel_id": event.channel_id, "user_id": event.user_id}
    return {"type": TYPE_DELETED, "channel_id": event.channel_id}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decode_event(data: Any) -> BusEvent | None:
    """A bus payload (JSON text or a dict) as a typed event; None if it is not one."""
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except ValueError:
            return None
    if not isinstance(data, dict):
        return None
    kind = data.get("type")
    if kind == TYPE_TOKEN_REVOKED:
        token_id, user_id = _int(data.get("token_id")), _int(data.get("user_id"))
        if token_id is None or user_id is None:
            return None
        return TokenRevoked(token_id, user_id)
    channel_id = _int(data.get("channel_id"))
    if channel_id is None:
        return None
    if kind == TYPE_MESSAGE:
        message = data.get("message")
        if not isinstance(message, dict) or _int(message.get("id")) is None:
            return None
        if message.get("channel_id") != channel_id:
            return None
        return MessagePosted(channel_id, _int(data.get("prev_id")), cast(MessageJson, message))
    user_id = _int(data.get("user_id"))
    if kind == TYPE_REVOKE and user_id is not None:
        return MemberRemoved(channel_id, user_id)
    if kind == TYPE_JOINED and user_id is not None:
        return MemberAdded(channel_id, user_id, _int(data.get("since")) or 0)
    if kind == TYPE_DELETED:
        return ChannelDeleted(channel_id)
    return None


class EventBus:
    """Publishes channel and token events to every server process (one pub/sub channel)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings,
        *,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.redis = redis
        self.channel = events_channel(settings.redis_db)
        # Shared with the cache (one per process and Redis): while it is open a publish
        # is skipped at once instead of waiting HERALD_BACKEND_TIMEOUT_S per post.
        self.breaker = breaker or CircuitBreaker("redis")
        self._throttle = Throttle(FAILURE_LOG_INTERVAL_S)

    async def publish(self, event: BusEvent) -> bool:
        """Publish after the database transaction committed. A Redis failure is logged,
        not raised: the change is stored, and every server process finds a message it
        missed in PostgreSQL (server/sse/feeds.py). True if Redis took it."""
        wire = encode_event(event)
        if not self.breaker.allow():
            self._failed(wire["type"], "circuit open")
            return False
        payload = json.dumps(wire, separators=(",", ":"), ensure_ascii=False)
        try:
            await self.redis.publish(self.channel, payload)
        except Exception as exc:
            self.breaker.failure()
            self._failed(wire["type"], exc.__class__.__name__)
            return False
        self.breaker.success()
        return True

    def _failed(self, kind: str, why: str) -> None:
        # No traceback, and one line per interval: during an outage every post comes here.
        left_out = self._throttle.allow("publish")
        if left_out is not None:
            logger.warning(
                "publishing %s event failed (%s; %d more failures not logged since the"
                " last line); subscribers catch up from PostgreSQL",
                kind,
                why,
                left_out,
            )

    async def message_posted(self, message: MessageJson, prev_id: int | None) -> None:
        await self.publish(MessagePosted(message["channel_id"], prev_id, message))

    async def member_added(self, channel_id: int, user_id: int, since: int) -> None:
        await self.publish(MemberAdded(channel_id, user_id, since))

    async def member_removed(self, channel_id: int, user_id: int) -> None:
        await self.publish(MemberRemoved(channel_id, user_id))

    async def channel_deleted(self, channel_id: int) -> None:
        await self.publish(ChannelDeleted(channel_id))

    async def token_revoked(self, token_id: int, user_id: int) -> bool:
        return await self.publish(TokenRevoked(token_id, user_id))
