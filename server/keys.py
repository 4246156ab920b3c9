"""Typed application state (``web.AppKey``), one key per resource."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web
from arq.connections import ArqRedis

from server.sse.hub import Hub
from server.sse.manager import StreamManager
from server.webfiles import WebFile
from shared.bus import EventBus
from shared.cache import MetadataCache
from shared.db.pool import Database
from shared.logcontext import Throttle
from shared.metrics import Metrics
from shared.services.attachments.service import AttachmentService
from shared.services.audit import AuditTrail
from shared.services.auth_limit import AuthFailureLimiter
from shared.services.channels import ChannelService
from shared.services.delayed.queue_stats import QueueStats
from shared.services.delayed.scheduling import DelayedMessageService
from shared.services.jobs import JobService
from shared.services.messages import MessageService
from shared.services.users import UserService
from shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DB = web.AppKey("db", Database)
REDIS = web.AppKey("redis", aioredis.Redis)
ARQ = web.AppKey("arq", ArqRedis)
BUS = web.AppKey("bus", EventBus)
CACHE = web.AppKey("cache", MetadataCache)
USERS = web.AppKey("users", UserService)
CHANNELS = web.AppKey("channels", ChannelService)
MESSAGES = web.AppKey("messages", MessageService)
DELAYED = web.AppKey("delayed", DelayedMessageService)
QUEUE_STATS = web.AppKey("queue_stats", QueueStats)
JOBS = web.AppKey("jobs", JobService)
ATTACHMENTS = web.AppKey("attachments", AttachmentService)
AUDIT = web.AppKey("audit", AuditTrail)
AUTH_LIMIT = web.AppKey("auth_limit", AuthFailureLimiter)
HUB = web.AppKey("hub", Hub)
STREAMS = web.AppKey("streams", StreamManager)
# "backend unavailable" answers, logged once per interval with a count (per app).
UNAVAILABLE_LOG = web.AppKey("unavailable_log", Throttle)
DRAINING = web.AppKey("draining", list)  # [bool]: set once shutdown begins
WEB_FILES = web.AppKey("web_files", dict[str, WebFile])  # the web client, HERALD_WEB_APP
