"""What every job gets: the same shared services the server builds, in arq's ``ctx``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from arq.connections import ArqRedis

from shared.bus import EventBus, arq_pool, close_redis, redis_client
from shared.db.monitor import QueryMonitor
from shared.db.pool import Database, create_pool
from shared.metrics import Metrics
from shared.services.wiring import Services, build_services
from shared.settings import Settings

CTX_KEY = "herald"


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    redis: aioredis.Redis
    bus: EventBus
    metrics: Metrics
    arq: ArqRedis
    services: Services
    # False when the pool is arq's own (the running worker's): arq closes that one.
    owns_arq: bool = False


def herald(ctx: dict[str, Any]) -> WorkerContext:
    """The typed context inside a job function."""
    value = ctx[CTX_KEY]
    assert isinstance(value, WorkerContext)
    return value


async def open_context(
    settings: Settings, metrics: Metrics | None = None, *, arq: ArqRedis | None = None
) -> WorkerContext:
    """Open the worker's resources and build its services; ``arq`` is the running
    worker's pool (without it, as in a test calling a job directly, one is opened)."""
    metrics = metrics or Metrics()
    # The worker's statements are timed and slow ones logged, exactly as the server's.
    monitor = QueryMonitor(slow_ms=settings.slow_query_ms, metrics=metrics)
    db = Database(
        await create_pool(settings.database_url, maxsize=5, wait_s=settings.backend_timeout_s),
        monitor=monitor,
    )
    redis = redis_client(settings)
    bus = EventBus(redis, settings)
    owns_arq = arq is None
    if arq is None:
        try:
            arq = await arq_pool(settings)
        except BaseException:
            await redis.aclose()
            await db.close()
            raise
    return WorkerContext(
        settings=settings,
        db=db,
        redis=redis,
        bus=bus,
        metrics=metrics,
        arq=arq,
        services=build_services(
            settings=settings, db=db, redis=redis, arq=arq, bus=bus, metrics=metrics
        ),
        owns_arq=owns_arq,
    )


async def close_context(wctx: WorkerContext) -> None:
    if wctx.owns_arq:
        await close_redis(wctx.arq)
    await close_redis(wctx.redis)
    await wctx.db.close()
