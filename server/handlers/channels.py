"""Channels, members and messages: parse, call one service, answer."""

from __future__ import annotations

from aiohttp import web

from server.keys import CHANNELS, MESSAGES
from server.middlewares import current_user, read_json
from server.params import int_param, optional_id, path_id, text_param
from shared.services.messages import MAX_BODY_CHARS
from shared.validation import channel_name, get_bool, get_id, get_text, require_object

MAX_LIMIT = 1000
TOPIC_MAX = 1000
MAX_CURSOR_CHARS = 64


async def create_channel(request: web.Request) -> web.Response:
    user = current_user(request)
    data = require_object(await read_json(request), {"name", "topic", "is_private"})
    name = channel_name(get_text(data, "name", max_len=80))
    topic = get_text(data, "topic", required=False, max_len=TOPIC_MAX, default="") or ""
    is_private = get_bool(data, "is_private", default=False)
    channel = await request.app[CHANNELS].create(user, name, topic, is_private)
    return web.json_response(channel, status=201)


async def list_channels(request: web.Request) -> web.Response:
    user = current_user(request)
    limit = int_param(request, "limit", default=100, minimum=1, maximum=MAX_LIMIT)
    cursor = text_param(request, "cursor", max_chars=MAX_CURSOR_CHARS)
    page = await request.app[CHANNELS].list_visible(user, limit=limit, cursor=cursor)
    return web.json_response(page)


async def get_channel(request: web.Request) -> web.Response:
    user = current_user(request)
    channel = await request.app[CHANNELS].get(user, path_id(request, "channel_id"))
    return web.json_response(channel)


async def update_channel(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    data = require_object(await read_json(request), {"name", "topic"})
    raw_name = get_text(data, "name", required=False, max_len=80)
    name = channel_name(raw_name) if raw_name is not None else None
    topic = get_text(data, "topic", required=False, max_len=TOPIC_MAX)
    channel = await request.app[CHANNELS].update(user, channel_id, name=name, topic=topic)
    return web.json_response(channel)


async def delete_channel(request: web.Request) -> web.Response:
    user = current_user(request)
    await request.app[CHANNELS].delete(user, path_id(request, "channel_id"))
    return web.Response(status=204)


async def add_member(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    data = require_object(await read_json(request), {"user_id"})
    await request.app[CHANNELS].add_member(user, channel_id, get_id(data, "user_id"))
    return web.Response(status=204)


async def remove_member(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    member_id = path_id(request, "user_id")
    await request.app[CHANNELS].remove_member(user, channel_id, member_id)
    return web.Response(status=204)


async def list_members(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    limit = int_param(request, "limit", default=100, minimum=1, maximum=MAX_LIMIT)
    cursor = text_param(request, "cursor", max_chars=MAX_CURSOR_CHARS)
    page = await request.app[CHANNELS].members(user, channel_id, limit=limit, cursor=cursor)
    return web.json_response(page)


async def mark_read(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    data = require_object(await read_json(request), {"message_id"})
    await request.app[MESSAGES].mark_read(user, channel_id, get_id(data, "message_id"))
    return web.Response(status=204)


async def post_message(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    data = require_object(await read_json(request), {"body"})
    body = get_text(data, "body", min_len=1, max_len=MAX_BODY_CHARS)
    assert body is not None
    message = await request.app[MESSAGES].post(user, channel_id, body)
    return web.json_response(message, status=201)


async def list_messages(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    before = optional_id(request, "before", zero=True)
    after = optional_id(request, "after", zero=True)
    limit = int_param(request, "limit", default=50, minimum=1, maximum=MAX_LIMIT)
    items = await request.app[MESSAGES].page(
        user, channel_id, before=before, after=after, limit=limit
    )
    return web.json_response({"items": items})
