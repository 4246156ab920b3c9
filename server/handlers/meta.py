"""``/me``, ``/users`` and ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from server.keys import METRICS, USERS
from server.middlewares import current_user
from server.params import int_param, text_param
from shared.services.users import MAX_NAME_CHARS

USERS_MAX_LIMIT = 100


async def me(request: web.Request) -> web.Response:
    return web.json_response(current_user(request).to_json())


async def list_users(request: web.Request) -> web.Response:
    current_user(request)
    limit = int_param(request, "limit", default=20, minimum=1, maximum=USERS_MAX_LIMIT)
    # No name is longer than MAX_NAME_CHARS, so neither is a prefix that can match one.
    prefix = text_param(request, "prefix", max_chars=MAX_NAME_CHARS) or ""
    items = await request.app[USERS].search(prefix, limit=limit)
    return web.json_response({"items": items})


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=request.app[METRICS].render())
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp
