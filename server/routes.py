"""Every route in one place."""

from __future__ import annotations

from aiohttp import web

from server import health
from server.handlers import channels, events, misc

API = "/api/v1"


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health.health)
    r.add_get("/metrics", misc.metrics)
    r.add_get(f"{API}/me", misc.me)
    r.add_post(f"{API}/channels", channels.create_channel)
    r.add_get(f"{API}/channels", channels.list_channels)
    r.add_get(f"{API}/channels/{{channel_id}}", channels.get_channel)
    r.add_patch(f"{API}/channels/{{channel_id}}", channels.update_channel)
    r.add_delete(f"{API}/channels/{{channel_id}}", channels.delete_channel)
    r.add_post(f"{API}/channels/{{channel_id}}/members", channels.add_member)
    r.add_delete(f"{API}/channels/{{channel_id}}/members/{{user_id}}", channels.remove_member)
    r.add_post(f"{API}/channels/{{channel_id}}/messages", channels.post_message)
    r.add_get(f"{API}/channels/{{channel_id}}/messages", channels.list_messages)
    r.add_get(f"{API}/channels/{{channel_id}}/events", events.channel_events, allow_head=False)
    r.add_get(f"{API}/admin/connections", misc.admin_connections)
