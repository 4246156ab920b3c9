"""The Redis side both processes share: clients, event publishing, the arq pool."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis.asyncio as aioredis
from arq.connections import ArqRedis, RedisSettings, create_pool

from shared.constants import events_channel
from shared.settings import Settings

logger = logging.getLogger(__name__)


def redis_client(settings: Settings) -> aioredis.Redis:
    """A client for keys and pub/sub; close it with ``aclose()``."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, health_check_interval=30
    )
    return client


def arq_settings(settings: Settings) -> RedisSettings:
    return RedisSettings.from_dsn(settings.redis_url)


async def arq_pool(settings: Settings) -> ArqRedis:
    return await create_pool(arq_settings(settings))


class EventBus:
    """Publishes channel events to every server process (one pub/sub channel)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.channel = events_channel(settings.redis_db)

    async def publish(self, event: dict[str, Any]) -> None:
        """Publish after the database transaction committed; a Redis failure is logged,
        not raised, because the message is already stored and replayable."""
        payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        try:
            await self.redis.publish(self.channel, payload)
        except Exception:
            logger.exception("publishing %s event failed", event.get("type"))

    async def message_posted(self, message: dict[str, Any]) -> None:
        await self.publish(
            {"type": "message", "channel_id": message["channel_id"], "message": message}
        )

    async def member_removed(self, channel_id: int, user_id: int) -> None:
        await self.publish({"type": "revoke", "channel_id": channel_id, "user_id": user_id})

    async def channel_deleted(self, channel_id: int) -> None:
        await self.publish({"type": "channel_deleted", "channel_id": channel_id})
