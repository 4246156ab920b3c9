"""The aiohttp application factory: no I/O here; resources open in ``cleanup_ctx``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from server.keys import (
    ARQ,
    BUS,
    CHANNELS,
    DB,
    DRAINING,
    HUB,
    MESSAGES,
    METRICS,
    REDIS,
    SETTINGS,
    STREAMS,
    USERS,
)
from server.middlewares import add_cors_headers, auth_middleware, cors_middleware, error_middleware
from server.routes import setup_routes
from server.sse.hub import Hub
from server.sse.manager import StreamManager
from shared.bus import EventBus, arq_pool, redis_client
from shared.constants import events_channel
from shared.db.pool import Database, create_pool
from shared.metrics import Metrics
from shared.services.channels import ChannelService
from shared.services.messages import MessageService
from shared.services.users import UserService
from shared.settings import Settings

# JSON bodies are small; attachments stream through the multipart reader instead.
MAX_JSON_BYTES = 1024 * 1024


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    db = Database(await create_pool(app[SETTINGS].database_url))
    app[DB] = db
    yield
    await db.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = redis_client(settings)
    app[REDIS] = client
    app[BUS] = EventBus(client, settings)
    yield
    await client.aclose()


async def arq_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await arq_pool(app[SETTINGS])
    app[ARQ] = pool
    yield
    await pool.aclose()


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    db, bus = app[DB], app[BUS]
    app[USERS] = UserService(db=db)
    app[CHANNELS] = ChannelService(db=db, bus=bus)
    app[MESSAGES] = MessageService(db=db, bus=bus)
    yield


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    hub = Hub(app[REDIS], events_channel(settings.redis_db), app[METRICS])
    hub.add_listener(app[STREAMS].on_event)
    app[HUB] = hub
    hub.start()
    yield
    await hub.stop()


async def on_shutdown(app: web.Application) -> None:
    app[DRAINING][0] = True
    app[STREAMS].close_all("shutdown")


def init_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """Build the app; nothing connects until it starts."""
    app = web.Application(
        middlewares=[cors_middleware, error_middleware, auth_middleware],
        client_max_size=MAX_JSON_BYTES,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app[DRAINING] = [False]
    app[STREAMS] = StreamManager(settings, app[METRICS])
    app.cleanup_ctx.extend([database_ctx, redis_ctx, arq_ctx, services_ctx, hub_ctx])
    app.on_response_prepare.append(add_cors_headers)
    app.on_shutdown.append(on_shutdown)
    setup_routes(app)
    return app
