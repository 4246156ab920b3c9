"""What every job gets: the same shared services the server builds, in arq's ``ctx``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from shared.bus import EventBus, redis_client
from shared.db.monitor import QueryMonitor
from shared.db.pool import Database, create_pool
from shared.metrics import Metrics
from shared.settings import Settings

CTX_KEY = "herald"


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    redis: aioredis.Redis
    bus: EventBus
    metrics: Metrics


def herald(ctx: dict[str, Any]) -> WorkerContext:
    """The typed context inside a job function."""
    value = ctx[CTX_KEY]
    assert isinstance(value, WorkerContext)
    return value


async def open_context(settings: Settings, metrics: Metrics | None = None) -> WorkerContext:
    metrics = metrics or Metrics()
    # The worker's statements are timed and slow ones logged, exactly as the server's.
    monitor = QueryMonitor(slow_ms=settings.slow_query_ms, metrics=metrics)
    db = Database(await create_pool(settings.database_url, maxsize=5), monitor=monitor)
    redis = redis_client(settings)
    return WorkerContext(
        settings=settings,
        db=db,
        redis=redis,
        bus=EventBus(redis, settings),
        metrics=metrics,
    )


async def close_context(wctx: WorkerContext) -> None:
    await wctx.redis.aclose()
    await wctx.db.close()
