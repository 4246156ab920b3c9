"""Admins only: ``GET /api/v1/admin/audit`` (the audit trail, filtered, newest first) and
``GET /api/v1/admin/connections`` (this process's SSE streams)."""

from __future__ import annotations

from aiohttp import web

from server.keys import AUDIT, STREAMS
from server.middlewares import current_user
from server.params import int_param, optional_id, text_param, time_param
from shared.errors import Forbidden
from shared.models import User

MAX_LIMIT = 1000
ADMIN_CONNECTIONS_MAX = 10_000
MAX_FILTER_CHARS = 1024


def require_admin(request: web.Request) -> User:
    """The one admin check of every admin route."""
    user = current_user(request)
    if not user.is_admin:
        raise Forbidden("admins only")
    return user


async def audit_log(request: web.Request) -> web.Response:
    """Filters: ``action``, ``target_type``, ``target_id``, ``since``/``until`` (RFC 3339,
    since inclusive, until exclusive), ``before`` (an id: page backwards), ``limit``."""
    require_admin(request)
    items = await request.app[AUDIT].query(
        action=text_param(request, "action", max_chars=MAX_FILTER_CHARS),
        target_type=text_param(request, "target_type", max_chars=MAX_FILTER_CHARS),
        target_id=text_param(request, "target_id", max_chars=MAX_FILTER_CHARS),
        since=time_param(request, "since"),
        until=time_param(request, "until"),
        before_id=optional_id(request, "before"),
        limit=int_param(request, "limit", default=100, minimum=1, maximum=MAX_LIMIT),
    )
    return web.json_response({"items": items})


async def admin_connections(request: web.Request) -> web.Response:
    """This process's SSE streams, oldest first; ``?channel_id=`` narrows to one
    channel, ``?limit=`` (1-10000, default 1000) caps the list; ``total`` counts all."""
    require_admin(request)
    channel_id = optional_id(request, "channel_id")
    limit = int_param(request, "limit", default=1000, minimum=1, maximum=ADMIN_CONNECTIONS_MAX)
    manager = request.app[STREAMS]
    items = manager.snapshot(channel_id, limit)
    return web.json_response({"items": items, "total": len(manager.streams)})
