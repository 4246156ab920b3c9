"""The reference web client at ``/app/`` (``HERALD_WEB_APP=1``; off, ``/app/`` is an
unknown route like any other). What is served and how: ``server/webfiles.py``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from server.keys import WEB_FILES
from server.webfiles import SECURITY_HEADERS, load_files, web_root

logger = logging.getLogger(__name__)

APP_PATH = "/app/"


async def web_app_ctx(app: web.Application) -> AsyncIterator[None]:
    root = web_root()
    if root is None:
        logger.error("HERALD_WEB_APP is on but the web client's files are not installed")
        app[WEB_FILES] = {}
    else:
        app[WEB_FILES] = await asyncio.to_thread(load_files, root)
        logger.info("web client at %s (%d files)", APP_PATH, len(app[WEB_FILES]))
    yield


async def app_redirect(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(APP_PATH)


async def app_file(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    found = request.app[WEB_FILES].get(name)
    if found is None:
        raise web.HTTPNotFound()
    resp = web.Response(body=found.body, headers=SECURITY_HEADERS)
    resp.content_type = found.content_type
    if found.content_type.startswith("text/") or found.content_type.endswith("+xml"):
        resp.charset = "utf-8"
    return resp


def setup_web_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/app", app_redirect)
    r.add_get(APP_PATH, app_file)
    r.add_get(APP_PATH + "{name}", app_file)
