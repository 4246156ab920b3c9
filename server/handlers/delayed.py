"""Delayed messages: schedule into a channel, list one's own, cancel."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from server.keys import DELAYED
from server.middlewares import current_user, read_json
from server.params import choice_param, int_param, optional_id, path_id
from shared.services.delayed.scheduling import MAX_AHEAD_S, STATUSES
from shared.services.messages import MAX_BODY_CHARS
from shared.validation import get_deliver_at, get_text, require_object

MAX_LIMIT = 1000
DEFAULT_LIMIT = 500


async def schedule_delayed(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    data = require_object(await read_json(request), {"body", "deliver_at", "delay_seconds"})
    body = get_text(data, "body", min_len=1, max_len=MAX_BODY_CHARS)
    assert body is not None
    deliver_at = get_deliver_at(data, datetime.now(UTC), max_ahead_s=MAX_AHEAD_S)
    delayed = await request.app[DELAYED].schedule(user, channel_id, body, deliver_at)
    return web.json_response(delayed, status=202)


async def list_delayed(request: web.Request) -> web.Response:
    user = current_user(request)
    status = choice_param(request, "status", STATUSES)
    limit = int_param(request, "limit", default=DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
    before = optional_id(request, "before")
    items = await request.app[DELAYED].list_own(user, status=status, limit=limit, before=before)
    return web.json_response({"items": items})


async def cancel_delayed(request: web.Request) -> web.Response:
    user = current_user(request)
    delayed_id = path_id(request, "delayed_id", "delayed message id")
    await request.app[DELAYED].cancel(user, delayed_id)
    return web.Response(status=204)
