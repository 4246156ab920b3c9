"""Every route in one place."""

from __future__ import annotations

from aiohttp import web

from server import health, openapi
from server.handlers import admin, attachments, channels, cron, delayed, events, meta, webapp
from server.middlewares import OPENAPI_PATH
from shared.constants import API_PREFIX as API


def setup_routes(app: web.Application, *, web_app: bool = False) -> None:
    """Every route; ``web_app`` (HERALD_WEB_APP) adds the web client's under /app/."""
    r = app.router
    r.add_get("/health", health.health)
    r.add_get("/metrics", meta.metrics)
    r.add_get(OPENAPI_PATH, openapi.openapi_json)
    r.add_get(f"{API}/me", meta.me)
    r.add_get(f"{API}/users", meta.list_users)
    r.add_post(f"{API}/channels", channels.create_channel)
    r.add_get(f"{API}/channels", channels.list_channels)
    r.add_get(f"{API}/channels/{{channel_id}}", channels.get_channel)
    r.add_patch(f"{API}/channels/{{channel_id}}", channels.update_channel)
    r.add_delete(f"{API}/channels/{{channel_id}}", channels.delete_channel)
    r.add_post(f"{API}/channels/{{channel_id}}/members", channels.add_member)
    r.add_get(f"{API}/channels/{{channel_id}}/members", channels.list_members)
    r.add_delete(f"{API}/channels/{{channel_id}}/members/{{user_id}}", channels.remove_member)
    r.add_post(f"{API}/channels/{{channel_id}}/read", channels.mark_read)
    r.add_post(f"{API}/channels/{{channel_id}}/messages", channels.post_message)
    r.add_get(f"{API}/channels/{{channel_id}}/messages", channels.list_messages)
    r.add_get(f"{API}/channels/{{channel_id}}/events", events.channel_events, allow_head=False)
    r.add_get(f"{API}/events", events.events, allow_head=False)
    r.add_get(f"{API}/admin/connections", admin.admin_connections)
    r.add_post(f"{API}/channels/{{channel_id}}/delayed-messages", delayed.schedule_delayed)
    r.add_get(f"{API}/delayed-messages", delayed.list_delayed)
    r.add_delete(f"{API}/delayed-messages/{{delayed_id}}", delayed.cancel_delayed)
    # No HEAD: a HEAD request must not start a cleanup run.
    cron_cleanup = f"{API}/cron/cleanup-delayed-messages"
    r.add_get(cron_cleanup, cron.cleanup_delayed_messages, allow_head=False)
    r.add_post(cron_cleanup, cron.cleanup_delayed_messages)
    r.add_post(f"{API}/channels/{{channel_id}}/attachments", attachments.upload_attachment)
    r.add_get(f"{API}/attachments/{{attachment_id}}", attachments.get_attachment)
    r.add_get(
        f"{API}/attachments/{{attachment_id}}/content",
        attachments.download_attachment,
        allow_head=False,
    )
    r.add_delete(f"{API}/attachments/{{attachment_id}}", attachments.delete_attachment)
    r.add_get(f"{API}/admin/audit", admin.audit_log)
    if web_app:
        webapp.setup_web_routes(app)
