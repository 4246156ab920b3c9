"""Delayed messages: schedule into a channel, list one's own, cancel."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from server.keys import DELAYED
from server.middlewares import current_user, read_json
from shared.errors import ValidationError
from shared.services.delayed.scheduling import MAX_AHEAD_S, STATUSES
from shared.services.messages import MAX_BODY_CHARS
from shared.validation import get_deliver_at, get_text, parse_id, parse_int_param, require_object

MAX_LIMIT = 1000
DEFAULT_LIMIT = 500


async def schedule_delayed(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = parse_id(request.match_info["channel_id"], "channel id")
    data = require_object(await read_json(request), {"body", "deliver_at", "delay_seconds"})
    body = get_text(data, "body", min_len=1, max_len=MAX_BODY_CHARS)
    assert body is not None
    deliver_at = get_deliver_at(data, datetime.now(UTC), max_ahead_s=MAX_AHEAD_S)
    delayed = await request.app[DELAYED].schedule(user, channel_id, body, deliver_at)
    return web.json_response(delayed, status=202)


async def list_delayed(request: web.Request) -> web.Response:
    user = current_user(request)
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise ValidationError(f"status: one of {', '.join(STATUSES)}")
    limit = parse_int_param(
        request.query.get("limit"), "limit", default=DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT
    )
    raw_before = request.query.get("before") or None
    before = parse_id(raw_before, "before") if raw_before is not None else None
    items = await request.app[DELAYED].list_own(user, status=status, limit=limit, before=before)
    return web.json_response({"items": items})


async def cancel_delayed(request: web.Request) -> web.Response:
    user = current_user(request)
    delayed_id = parse_id(request.match_info["delayed_id"], "delayed message id")
    await request.app[DELAYED].cancel(user, delayed_id)
    return web.Response(status=204)
