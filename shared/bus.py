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

from shared.constants import events_channel
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

    With ``REDIS_SENTINELS`` every new connection asks the Sentinels for the master
    first, so after a failover each reconnect (the hub's among them) reaches the new
    one; ``REDIS_URL`` then gives only the database and the credentials."""
    if settings.redis_sentinels:
        username, password = settings.redis_credentials
        # Sentinel takes the socket_* options for its own queries as well.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(settings.redis_sentinels), socket_connect_timeout=5, health_check_interval=30
        )
        master: aioredis.Redis = sentinel.master_for(
            settings.redis_sentinel_master,
            connection_pool_class=MasterPool,
            db=settings.redis_db,
            username=username,
            password=password,
        )
        return master
    client: aioredis.Redis = aioredis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, health_check_interval=30
    )
    return client


def arq_settings(settings: Settings) -> RedisSettings:
    if settings.redis_sentinels:
        username, password = settings.redis_credentials
        return RedisSettings(
            host=list(settings.redis_sentinels),
            sentinel=True,
            sentinel_master=settings.redis_sentinel_master,
            database=settings.redis_db,
            username=username,
            password=password,
        )
    return RedisSettings.from_dsn(settings.redis_url)


async def arq_pool(settings: Settings) -> ArqRedis:
    return await create_pool(arq_settings(settings))


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

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.channel = events_channel(settings.redis_db)

    async def publish(self, event: BusEvent) -> bool:
        """Publish after the database transaction committed. A Redis failure is logged,
        not raised: the change is stored, and every server process finds a message it
        missed in PostgreSQL (server/sse/feeds.py). True if Redis took it."""
        wire = encode_event(event)
        payload = json.dumps(wire, separators=(",", ":"), ensure_ascii=False)
        try:
            await self.redis.publish(self.channel, payload)
        except Exception as exc:
            # One line, no traceback: during an outage every post comes here.
            logger.warning(
                "publishing %s event failed (%s); subscribers catch up from PostgreSQL",
                wire["type"],
                exc.__class__.__name__,
            )
            return False
        return True

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
