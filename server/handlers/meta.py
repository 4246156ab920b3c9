"""``/me`` and ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from server.keys import METRICS
from server.middlewares import current_user


async def me(request: web.Request) -> web.Response:
    return web.json_response(current_user(request).to_json())


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=request.app[METRICS].render())
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp
