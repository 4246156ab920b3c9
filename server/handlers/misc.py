"""``/me``, ``/admin/connections``, ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from server.keys import METRICS, STREAMS
from server.middlewares import current_user
from shared.errors import Forbidden
from shared.models import User, iso  # noqa: F401


async def me(request: web.Request) -> web.Response:
    return web.json_response(current_user(request).to_json())


def require_admin(request: web.Request) -> User:
    user = current_user(request)
    if not user.is_admin:
        raise Forbidden("admins only")
    return user


async def admin_connections(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response({"items": request.app[STREAMS].snapshot()})


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=request.app[METRICS].render())
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp
