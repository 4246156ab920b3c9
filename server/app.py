"""The aiohttp application factory: no I/O here; resources open in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from server.handlers.webapp import web_app_ctx
from server.http_metrics import http_metrics_middleware, route_template
from server.keys import (
    ARQ,
    ATTACHMENTS,
    AUDIT,
    AUTH_LIMIT,
    BUS,
    CACHE,
    CHANNELS,
    DB,
    DELAYED,
    DRAINING,
    HUB,
    JOBS,
    MESSAGES,
    METRICS,
    QUEUE_STATS,
    REDIS,
    SETTINGS,
    STREAMS,
    UNAVAILABLE_LOG,
    USERS,
)
from server.middlewares import (
    Handler,
    add_cors_headers,
    auth_middleware,
    cors_middleware,
    error_middleware,
)
from server.protocol import add_request_id_header
from server.routes import setup_routes
from server.sse.feeds import Feeds
from server.sse.hub import Hub
from server.sse.leases import IpLeases
from server.sse.manager import StreamManager
from server.sse.tokens import TokenWatch
from shared.breaker import CircuitBreaker
from shared.bus import EventBus, arq_pool, close_redis, redis_client
from shared.constants import events_channel
from shared.db.monitor import QueryMonitor, query_scope
from shared.db.pool import Database, create_pool
from shared.logcontext import FAILURE_LOG_INTERVAL_S, Throttle
from shared.metrics import Metrics
from shared.services.auth_limit import AuthFailureLimiter
from shared.services.keys import CURSOR_KEY, load_key
from shared.services.wiring import build_services
from shared.settings import Settings
from shared.tasks import cancel_and_wait

# JSON bodies are small; attachments stream through the multipart reader instead.
MAX_JSON_BYTES = 1024 * 1024


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    monitor = QueryMonitor(slow_ms=settings.slow_query_ms, metrics=app[METRICS])
    db = Database(
        await create_pool(settings.database_url, wait_s=settings.backend_timeout_s),
        monitor=monitor,
    )
    app[DB] = db
    yield
    await db.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = redis_client(settings)
    app[REDIS] = client
    # One breaker per app and Redis, shared by the bus and the cache (build_services).
    app[BUS] = EventBus(client, settings, breaker=CircuitBreaker("redis"))
    yield
    await close_redis(client)


async def arq_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await arq_pool(app[SETTINGS])
    app[ARQ] = pool
    yield
    await close_redis(pool)


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    services = build_services(
        settings=app[SETTINGS],
        db=app[DB],
        redis=app[REDIS],
        arq=app[ARQ],
        bus=app[BUS],
        metrics=app[METRICS],
        breaker=app[BUS].breaker,
    )
    app[CACHE] = services.cache
    app[USERS] = services.users
    app[CHANNELS] = services.channels
    app[MESSAGES] = services.messages
    app[QUEUE_STATS] = services.queue_stats
    app[DELAYED] = services.delayed
    app[JOBS] = services.jobs
    app[ATTACHMENTS] = services.attachments
    app[AUDIT] = services.audit
    app[AUTH_LIMIT] = AuthFailureLimiter(
        redis=app[REDIS],
        limit=app[SETTINGS].auth_fail_limit,
        metrics=app[METRICS],
        breaker=app[BUS].breaker,
        wait_s=app[SETTINGS].backend_timeout_s,
    )
    yield


async def delayed_ctx(app: web.Application) -> AsyncIterator[None]:
    """Delayed messages' background work: keeps the shared queue figures in /metrics
    fresh (the worker writes them); at shutdown, lets an admission batch finish."""
    task = asyncio.create_task(app[QUEUE_STATS].refresh_forever(), name="queue-figures")
    yield
    await cancel_and_wait(task)
    await app[DELAYED].close()


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, manager = app[SETTINGS], app[STREAMS]
    feeds = Feeds(messages=app[MESSAGES], sink=manager, settings=settings, metrics=app[METRICS])
    leases = IpLeases(redis=app[REDIS], settings=settings, metrics=app[METRICS])
    manager.attach(feeds, app[MESSAGES], await load_key(app[DB], CURSOR_KEY), leases, app[CHANNELS])
    hub = Hub(app[REDIS], events_channel(settings.redis_db), app[METRICS])
    hub.add_listener(manager.on_event)
    # Revoked or expired tokens: their streams end, their cache entries go, by the bus
    # and by a sweep of PostgreSQL each second (server/sse/tokens.py).
    tokens = TokenWatch(manager=manager, users=app[USERS], timeout_s=settings.backend_timeout_s)
    hub.add_listener(tokens.on_event)
    hub.on_subscribed.append(feeds.bus_back)
    hub.on_lost.append(feeds.bus_lost)
    feeds.access_check = manager.recheck_access
    app[HUB] = hub
    feeds.start()  # ordered per-channel feeds; reconciles with PostgreSQL (feeds.py)
    hub.start()
    manager.start()  # the one process-wide SSE timer (heartbeats, stale checks)
    leases.start(manager.ip_holders)  # per-IP slots shared by every process
    tokens.start()
    yield
    await tokens.stop()
    await manager.stop()
    await leases.stop()
    await hub.stop()
    await feeds.stop()


def begin_draining(app: web.Application) -> None:
    """From now on: /health answers 503 "draining", new streams 503."""
    app[DRAINING][0] = True
    app[STREAMS].draining = True


async def on_shutdown(app: web.Application) -> None:
    # Runs after the listening sockets closed (aiohttp's order): every stream gets
    # `close` (shutdown) and up to HERALD_SHUTDOWN_TIMEOUT_S to end, then is dropped.
    begin_draining(app)
    await app[STREAMS].drain(app[SETTINGS].shutdown_timeout_s)


@web.middleware
async def query_count_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts each request's database statements (per route, in the query monitor)."""
    with query_scope() as scope:
        try:
            return await handler(request)
        finally:
            monitor = request.app[DB].monitor if DB in request.app else None
            if monitor is not None:
                monitor.request_done(route_template(request), scope)


def init_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """Build the app; nothing connects until it starts."""
    app = web.Application(
        middlewares=[
            http_metrics_middleware,
            query_count_middleware,
            cors_middleware,
            error_middleware,
            auth_middleware,
        ],
        client_max_size=MAX_JSON_BYTES,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app[DRAINING] = [False]
    app[UNAVAILABLE_LOG] = Throttle(FAILURE_LOG_INTERVAL_S)
    app[STREAMS] = StreamManager(settings, app[METRICS])
    app.cleanup_ctx.extend([database_ctx, redis_ctx, arq_ctx, services_ctx, delayed_ctx, hub_ctx])
    if settings.web_app:
        app.cleanup_ctx.append(web_app_ctx)
    app.on_response_prepare.append(add_cors_headers)
    app.on_response_prepare.append(add_request_id_header)
    app.on_shutdown.append(on_shutdown)
    setup_routes(app, web_app=settings.web_app)
    return app
