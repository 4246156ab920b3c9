"""``/me``, ``/admin/connections``, ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from server.keys import METRICS, STREAMS
from server.middlewares import current_user
from shared.errors import Forbidden
from shared.models import User, iso  # noqa: F401
from shared.validation import parse_id, parse_int_param


async def me(request: web.Request) -> web.Response:
    return web.json_response(current_user(request).to_json())


def require_admin(request: web.Request) -> User:
    user = current_user(request)
    if not user.is_admin:
        raise Forbidden("admins only")
    return user


ADMIN_CONNECTIONS_MAX = 10_000


async def admin_connections(request: web.Request) -> web.Response:
    """This process's SSE streams, oldest first; ``?channel_id=`` narrows to one
    channel, ``?limit=`` (1-10000, default 1000) caps the list; ``total`` counts all."""
    require_admin(request)
    raw_channel = request.query.get("channel_id")
    channel_id = None if raw_channel in (None, "") else parse_id(raw_channel, "channel_id")
    limit = parse_int_param(
        request.query.get("limit"),
        "limit",
        default=1000,
        minimum=1,
        maximum=ADMIN_CONNECTIONS_MAX,
    )
    manager = request.app[STREAMS]
    items = manager.snapshot(channel_id, limit)
    return web.json_response({"items": items, "total": len(manager.streams)})


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=request.app[METRICS].render())
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp
