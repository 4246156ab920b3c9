"""Typed application state (``web.AppKey``), one key per resource."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web
from arq.connections import ArqRedis

from server.sse.hub import Hub
from server.sse.manager import StreamManager
from shared.bus import EventBus
from shared.db.pool import Database
from shared.metrics import Metrics
from shared.services.channels import ChannelService
from shared.services.messages import MessageService
from shared.services.users import UserService
from shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DB = web.AppKey("db", Database)
REDIS = web.AppKey("redis", aioredis.Redis)
ARQ = web.AppKey("arq", ArqRedis)
BUS = web.AppKey("bus", EventBus)
USERS = web.AppKey("users", UserService)
CHANNELS = web.AppKey("channels", ChannelService)
MESSAGES = web.AppKey("messages", MessageService)
HUB = web.AppKey("hub", Hub)
STREAMS = web.AppKey("streams", StreamManager)
DRAINING = web.AppKey("draining", list)  # [bool]: set once shutdown begins
