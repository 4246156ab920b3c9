"""Admins only: ``GET /api/v1/admin/audit`` (the audit trail, filtered, newest first) and
``GET /api/v1/admin/connections`` (this process's SSE streams)."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from server.keys import AUDIT, STREAMS
from server.middlewares import current_user
from shared.errors import Forbidden, ValidationError
from shared.models import User
from shared.validation import check_storable, parse_id, parse_int_param, parse_rfc3339

MAX_LIMIT = 1000
ADMIN_CONNECTIONS_MAX = 10_000
MAX_FILTER_CHARS = 1024


def require_admin(request: web.Request) -> User:
    """The one admin check of every admin route."""
    user = current_user(request)
    if not user.is_admin:
        raise Forbidden("admins only")
    return user


def _text(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    check_storable(raw, name)
    if len(raw) > MAX_FILTER_CHARS:
        raise ValidationError(f"{name}: at most {MAX_FILTER_CHARS} characters")
    return raw


def _time(request: web.Request, name: str) -> datetime | None:
    """An RFC 3339 time; without an offset it is taken as UTC."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    return parse_rfc3339(raw, name, offset_required=False)


async def audit_log(request: web.Request) -> web.Response:
    """Filters: ``action``, ``target_type``, ``target_id``, ``since``/``until`` (RFC 3339,
    since inclusive, until exclusive), ``before`` (an id: page backwards), ``limit``."""
    require_admin(request)
    before_raw = request.query.get("before")
    items = await request.app[AUDIT].query(
        action=_text(request, "action"),
        target_type=_text(request, "target_type"),
        target_id=_text(request, "target_id"),
        since=_time(request, "since"),
        until=_time(request, "until"),
        before_id=parse_id(before_raw, "before") if before_raw else None,
        limit=parse_int_param(
            request.query.get("limit"), "limit", default=100, minimum=1, maximum=MAX_LIMIT
        ),
    )
    return web.json_response({"items": items})


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
