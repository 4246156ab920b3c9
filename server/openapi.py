"""The OpenAPI 3.1 description of every ``/api/v1`` route, served at
``GET /api/v1/openapi.json`` without auth.

Plain Python data, built once at import and encoded once on first request. The limits
come from the modules that enforce them, so a changed limit changes the document too;
tests/server/test_openapi.py compares its paths and methods with the router, and
tests/server/test_schemathesis.py checks live answers against it.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from aiohttp import web

from server.handlers.admin import ADMIN_CONNECTIONS_MAX, MAX_FILTER_CHARS
from server.handlers.channels import MAX_CURSOR_CHARS, TOPIC_MAX
from server.handlers.cron import MAX_WAIT_S
from server.handlers.delayed import DEFAULT_LIMIT as DELAYED_DEFAULT_LIMIT
from shared.constants import API_PREFIX
from shared.services.delayed.scheduling import MAX_AHEAD_S, STATUSES
from shared.services.messages import MAX_BODY_CHARS
from shared.validation import MAX_BIGINT

Schema = dict[str, Any]

MAX_LIMIT = 1000
USERS_MAX_LIMIT = 100


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: list[str], properties: dict[str, Schema], **extra: Any) -> Schema:
    return {"type": "object", "required": required, "properties": properties, **extra}


ID: Schema = {"type": "integer", "minimum": 1, "maximum": MAX_BIGINT}
TIME: Schema = {"type": "string", "format": "date-time"}
NULLABLE_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
NULLABLE_ID: Schema = {"type": ["integer", "null"], "minimum": 1}

SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        ["error"],
        {
            "error": obj(
                ["code", "message"],
                {
                    "code": {"type": "string", "pattern": "^[a-z0-9_]+$"},
                    "message": {"type": "string"},
                },
            )
        },
    ),
    "User": obj(
        ["id", "name", "is_admin"],
        {"id": ID, "name": {"type": "string"}, "is_admin": {"type": "boolean"}},
    ),
    "Author": obj(["id", "name"], {"id": ID, "name": {"type": "string"}}),
    "Message": obj(
        ["id", "channel_id", "author", "body", "created_at"],
        {
            "id": ID,
            "channel_id": ID,
            "author": ref("Author"),
            "body": {"type": "string", "minLength": 1, "maxLength": MAX_BODY_CHARS},
            "created_at": TIME,
        },
    ),
    "Channel": obj(
        ["id", "name", "topic", "is_private", "created_by", "created_at", "updated_at"],
        {
            "id": ID,
            "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,80}$"},
            "topic": {"type": "string", "maxLength": TOPIC_MAX},
            "is_private": {"type": "boolean"},
            "created_by": NULLABLE_ID,
            "created_at": TIME,
            "updated_at": TIME,
            "member_count": {"type": "integer", "minimum": 0},
        },
    ),
    "ChannelListing": {
        "allOf": [
            ref("Channel"),
            obj(
                ["member_count", "last_message", "unread_count"],
                {
                    "member_count": {"type": "integer", "minimum": 0},
                    "last_message": {"oneOf": [ref("Message"), {"type": "null"}]},
                    "unread_count": {"type": "integer", "minimum": 0},
                },
            ),
        ]
    },
    "ChannelPage": obj(
        ["items", "next_cursor"],
        {
            "items": {"type": "array", "items": ref("ChannelListing")},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "opaque; pass back as ?cursor=; null on the last page",
            },
        },
    ),
    "MessagePage": obj(
        ["items"], {"items": {"type": "array", "items": ref("Message"), "maxItems": MAX_LIMIT}}
    ),
    "DelayedMessage": obj(
        [
            "id",
            "channel_id",
            "author_id",
            "body",
            "deliver_at",
            "status",
            "reason",
            "message_id",
            "created_at",
            "finished_at",
        ],
        {
            "id": ID,
            "channel_id": NULLABLE_ID,
            "author_id": ID,
            "body": {"type": "string"},
            "deliver_at": TIME,
            "status": {"enum": list(STATUSES)},
            "reason": {
                "type": ["string", "null"],
                "description": "when failed: too_late, not_allowed or channel_deleted",
            },
            "message_id": NULLABLE_ID,
            "created_at": TIME,
            "finished_at": NULLABLE_TIME,
        },
    ),
    "DelayedPage": obj(["items"], {"items": {"type": "array", "items": ref("DelayedMessage")}}),
    "Attachment": obj(
        [
            "id",
            "channel_id",
            "uploader_id",
            "filename",
            "content_type",
            "size",
            "sha256",
            "created_at",
        ],
        {
            "id": ID,
            "channel_id": ID,
            "uploader_id": NULLABLE_ID,
            "filename": {"type": "string", "maxLength": 255},
            "content_type": {"type": "string"},
            "size": {"type": "integer", "minimum": 0},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "created_at": TIME,
        },
    ),
    "AuditEntry": obj(
        [
            "id",
            "at",
            "actor_id",
            "action",
            "target_type",
            "target_id",
            "result",
            "details",
            "client_ip",
        ],
        {
            "id": ID,
            "at": TIME,
            "actor_id": NULLABLE_ID,
            "action": {"type": "string", "examples": ["attachment.delete"]},
            "target_type": {"type": "string"},
            "target_id": {"type": "string"},
            "result": {"type": "string", "examples": ["ok", "denied", "failed"]},
            "details": {"type": "object"},
            "client_ip": {"type": ["string", "null"]},
        },
    ),
    "AuditPage": obj(
        ["items"], {"items": {"type": "array", "items": ref("AuditEntry"), "maxItems": MAX_LIMIT}}
    ),
    "Connection": obj(
        [
            "id",
            "ip",
            "channel_id",
            "user_id",
            "connected_at",
            "last_write_at",
            "events_sent",
            "state",
        ],
        {
            "id": {"type": "string"},
            "ip": {"type": "string"},
            "channel_id": {
                "type": ["integer", "null"],
                "description": "null for a multi-channel stream (see channels)",
            },
            "channels": {"type": "array", "items": ID},
            "user_id": ID,
            "connected_at": TIME,
            "last_write_at": TIME,
            "events_sent": {"type": "integer", "minimum": 0},
            "state": {"type": "string", "examples": ["setup", "live", "closing", "stale"]},
        },
    ),
    "ConnectionPage": obj(
        ["items", "total"],
        {
            "items": {"type": "array", "items": ref("Connection")},
            "total": {"type": "integer", "minimum": 0},
        },
    ),
    "CronResult": obj(
        ["job_id", "status"],
        {
            "job_id": {"type": "string"},
            "status": {
                "type": "string",
                "description": "succeeded or failed once finished; the job's state on 202",
            },
            "deleted": {"type": "integer", "minimum": 0},
            "batches": {"type": "integer", "minimum": 0},
            "duration_ms": {"type": "number", "minimum": 0},
            "run_id": {"type": ["string", "integer"]},
            "error": {"type": "string"},
        },
    ),
    "NewChannel": obj(
        ["name"],
        {
            "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,80}$"},
            "topic": {"type": ["string", "null"], "maxLength": TOPIC_MAX},
            "is_private": {"type": ["boolean", "null"]},
        },
        additionalProperties=False,
    ),
    "ChannelChange": obj(
        [],
        {
            "name": {"type": ["string", "null"], "pattern": "^[a-z0-9_-]{1,80}$"},
            "topic": {"type": ["string", "null"], "maxLength": TOPIC_MAX},
        },
        additionalProperties=False,
    ),
    "NewMember": obj(["user_id"], {"user_id": ID}, additionalProperties=False),
    "ReadMark": obj(["message_id"], {"message_id": ID}, additionalProperties=False),
    "Member": obj(
        ["user_id", "name", "joined_at", "last_read_id"],
        {
            "user_id": ID,
            "name": {"type": "string"},
            "joined_at": TIME,
            "last_read_id": {"type": "integer", "minimum": 0},
        },
    ),
    "MemberPage": obj(
        ["items", "next_cursor"],
        {
            "items": {"type": "array", "items": ref("Member")},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "opaque; pass back as ?cursor=; null on the last page",
            },
        },
    ),
    "UserName": obj(["id", "name"], {"id": ID, "name": {"type": "string"}}),
    "UserList": obj(["items"], {"items": {"type": "array", "items": ref("UserName")}}),
    "NewMessage": obj(
        ["body"],
        {"body": {"type": "string", "minLength": 1, "maxLength": MAX_BODY_CHARS}},
        additionalProperties=False,
    ),
    "NewDelayedMessage": {
        **obj(
            ["body"],
            {
                "body": {"type": "string", "minLength": 1, "maxLength": MAX_BODY_CHARS},
                "deliver_at": {
                    "type": "string",
                    "format": "date-time",
                    "description": "RFC 3339 with an offset; in the future, at most "
                    f"{MAX_AHEAD_S // 86400} days ahead",
                },
                "delay_seconds": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": MAX_AHEAD_S,
                },
            },
            additionalProperties=False,
        ),
        "oneOf": [{"required": ["deliver_at"]}, {"required": ["delay_seconds"]}],
    },
    "Upload": obj(
        ["file"], {"file": {"type": "string", "format": "binary", "contentMediaType": "*/*"}}
    ),
    "OpenAPI": {"type": "object", "description": "this document"},
}

RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def error(description: str, *, retry_after: bool = False) -> Schema:
    out: Schema = {
        "description": description,
        "content": {"application/json": {"schema": ref("Error")}},
    }
    if retry_after:
        out["headers"] = RETRY_AFTER
    return out


RESPONSES: dict[str, Schema] = {
    "InvalidJson": error("`invalid_json`: the body does not parse as JSON"),
    "Unauthorized": error("`unauthorized`: token missing, malformed, unknown, revoked or expired"),
    "Forbidden": error("`forbidden`: authenticated but not allowed"),
    "NotFound": error(
        "no such resource (`channel_not_found`, `user_not_found`, `member_not_found`, "
        "`delayed_message_not_found`, `attachment_not_found`, `file_missing`), or a "
        "private channel the caller cannot see"
    ),
    "Conflict": error("conflicts with the current state"),
    "TooLarge": error("`payload_too_large`: the body is over the limit"),
    "Invalid": error(
        "`validation_error`: JSON that is not an object, a missing, unknown or mistyped "
        "field, an out-of-range value or query parameter, text PostgreSQL cannot store"
    ),
    "TooMany": error(
        "a limit was reached (`too_many_auth_failures`, and what the operation lists)",
        retry_after=True,
    ),
    "Unavailable": error(
        "`service_unavailable`: PostgreSQL or Redis is not answering; retry later "
        "(also `shutting_down` on a stream while the server drains)",
        retry_after=True,
    ),
    "InsufficientStorage": error("`insufficient_storage`: the upload directory is full"),
}


def r(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def ok(status: str, description: str, schema: str | None = None) -> dict[str, Schema]:
    body: Schema = {"description": description}
    if schema is not None:
        body["content"] = {"application/json": {"schema": ref(schema)}}
    return {status: body}


def op(
    summary: str,
    success: dict[str, Schema],
    *,
    tag: str,
    body: str | None = None,
    params: list[Schema] | None = None,
    errors: tuple[str, ...] = (),
    auth: bool = True,
    **extra: Any,
) -> Schema:
    """One operation: its answers are the success ones, the errors it names, and the
    errors every operation can give (401/429 with auth, 503 always)."""
    responses: dict[str, Schema] = dict(success)
    names = list(errors)
    if body is not None:
        names += ["400", "413", "422"]
    if params:
        names.append("422")
    if auth:
        names += ["401", "429"]
    names.append("503")
    by_status = {
        "400": "InvalidJson",
        "401": "Unauthorized",
        "403": "Forbidden",
        "404": "NotFound",
        "409": "Conflict",
        "413": "TooLarge",
        "422": "Invalid",
        "429": "TooMany",
        "503": "Unavailable",
        "507": "InsufficientStorage",
    }
    for status in sorted(set(names)):
        responses.setdefault(status, r(by_status[status]))
    out: Schema = {"summary": summary, "tags": [tag], "responses": responses, **extra}
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(body)}},
        }
    if not auth:
        out["security"] = []
    return out


def path_param(name: str, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": ID}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}  # fmt: skip


def limit(default: int, maximum: int) -> Schema:
    return query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": maximum, "default": default},
        f"page size, 1-{maximum}",
    )


CHANNEL_ID = path_param("channel_id", "a channel id")
LAST_EVENT_ID_HEADER = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "resume point; wins over ?last_event_id=",
    "schema": {"type": "string"},
}
ACCESS_TOKEN = query(
    "access_token", {"type": "string"}, "the token, for EventSource (which cannot set headers)"
)

STREAM_LIMITS = (
    "Refused before the stream starts: 429 `too_many_connections` (per client address, "
    "`HERALD_SSE_MAX_PER_IP`) or `server_busy` (per process, `HERALD_SSE_MAX_CONNECTIONS`), "
    "503 `shutting_down` while the server drains; each with `Retry-After`. Headers: "
    "`Cache-Control: no-cache`, `X-Accel-Buffering: no`. Every event's `data:` is one "
    "line of JSON. Events: `ready` (first, after `retry: 3000`), `message` (the message "
    "object), `heartbeat` `{ts}` every `HERALD_SSE_HEARTBEAT_S`, `reset`, and `close` "
    '`{reason: "shutdown"|"revoked"|"stale"|"slow_consumer", reconnect_after_ms}` after a '
    "`retry:` line, then the response ends."
)


def stream_answer(description: str) -> dict[str, Schema]:
    return {
        "200": {
            "description": description,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }


CHANNEL_STREAM = (
    "One channel's live messages. `ready` data `{connection_id, channel_id, heartbeat_s}`; "
    "`message` carries `id: <message id>`. With `Last-Event-ID` (or `?last_event_id=`, "
    "a message id) every newer message is replayed in order first; more than 1000 "
    "missed: `reset` (`id: L`, data `{last_id: L}`) and the client refetches over REST. "
    + STREAM_LIMITS
)
MULTI_STREAM = (
    "Several channels on one stream (it counts as one connection). `?channels=1,2,3`: "
    "those channels (1 to `HERALD_SSE_MAX_CHANNELS` distinct ids, more: 422; any id the "
    "caller cannot see: 404 `channel_not_found`, naming none). No `channels`: every "
    "channel the caller is a member of, kept current: `subscribed` `{channel_id}` when "
    "one is joined, `unsubscribed` `{channel_id, reason}` when one is left or deleted. "
    "`ready` data `{connection_id, channels, heartbeat_s}`. `message` carries an opaque "
    "cursor as `id:` (at most 512 printable ASCII characters); resuming with it replays, "
    "per channel, what was missed; a channel more than 1000 behind gets `reset` "
    "`{channel_id, last_id}`. A numeric `Last-Event-ID` means after that id in every "
    "channel; a cursor Herald did not write: 422. " + STREAM_LIMITS
)

PATHS: dict[str, dict[str, Any]] = {
    "/openapi.json": {
        "get": op(
            "This document (OpenAPI 3.1)",
            ok("200", "the API description", "OpenAPI"),
            tag="meta",
            auth=False,
        )
    },
    "/me": {"get": op("The caller", ok("200", "the caller", "User"), tag="users")},
    "/channels": {
        "post": op(
            "Create a channel; the creator is its first member",
            ok("201", "the channel (member_count 1)", "Channel"),
            tag="channels",
            body="NewChannel",
            errors=("409",),
            description="409 `name_taken` when the name is in use.",
        ),
        "get": op(
            "The channels the caller can see, in id order",
            ok("200", "a page of channels", "ChannelPage"),
            tag="channels",
            params=[
                limit(100, MAX_LIMIT),
                query(
                    "cursor",
                    {"type": "string", "maxLength": MAX_CURSOR_CHARS},
                    "next_cursor of the previous page",
                ),
            ],
        ),
    },
    "/channels/{channel_id}": {
        "parameters": [CHANNEL_ID],
        "get": op(
            "A channel", ok("200", "the channel", "Channel"), tag="channels", errors=("404",)
        ),
        "patch": op(
            "Rename a channel or change its topic (creator or admin)",
            ok("200", "the channel", "Channel"),
            tag="channels",
            body="ChannelChange",
            errors=("403", "404", "409"),
            description="An absent or null field is left as it is; 409 `name_taken`.",
        ),
        "delete": op(
            "Delete a channel (creator or admin); its streams get close `revoked`",
            ok("204", "deleted"),
            tag="channels",
            errors=("403", "404"),
        ),
    },
    "/users": {
        "get": op(
            "Users whose name starts with a prefix (case-insensitive), in name order",
            ok("200", "matching users", "UserList"),
            tag="users",
            params=[
                query("prefix", {"type": "string", "maxLength": 80}, "a name prefix"),
                limit(20, 100),
            ],
        ),
    },
    "/channels/{channel_id}/read": {
        "parameters": [CHANNEL_ID],
        "post": op(
            "Move the caller's read position forward to a message (never back)",
            ok("204", "marked (an older id changes nothing)"),
            tag="members",
            body="ReadMark",
            errors=("403", "404"),
            description="404 `message_not_found` for a message of another channel or none; "
            "403 when the caller can see the channel but is not a member.",
        ),
    },
    "/channels/{channel_id}/members": {
        "parameters": [CHANNEL_ID],
        "get": op(
            "A channel's members in user id order",
            ok("200", "a page of members", "MemberPage"),
            tag="members",
            params=[
                limit(100, MAX_LIMIT),
                query(
                    "cursor",
                    {"type": "string", "maxLength": MAX_CURSOR_CHARS},
                    "next_cursor of the previous page",
                ),
            ],
            errors=("404",),
        ),
        "post": op(
            "Add a member (creator or admin; anyone may join a public channel)",
            ok("204", "a member (also when already one)"),
            tag="members",
            body="NewMember",
            errors=("403", "404"),
        ),
    },
    "/channels/{channel_id}/members/{user_id}": {
        "parameters": [CHANNEL_ID, path_param("user_id", "a user id")],
        "delete": op(
            "Remove a member (creator or admin; a member may leave); their streams on it "
            "get close `revoked`",
            ok("204", "removed"),
            tag="members",
            errors=("403", "404"),
        ),
    },
    "/channels/{channel_id}/messages": {
        "parameters": [CHANNEL_ID],
        "post": op(
            "Post a message; it is delivered to the channel's streams",
            ok("201", "the message", "Message"),
            tag="messages",
            body="NewMessage",
            errors=("404",),
        ),
        "get": op(
            "A page of messages, oldest first",
            ok("200", "the messages", "MessagePage"),
            tag="messages",
            errors=("404",),
            params=[
                query(
                    "before",
                    {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT},
                    "only ids below this (the newest of them)",
                ),
                query(
                    "after",
                    {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT},
                    "only ids above this (the oldest of them)",
                ),
                limit(50, MAX_LIMIT),
            ],
        ),
    },
    "/channels/{channel_id}/events": {
        "parameters": [CHANNEL_ID],
        "get": op(
            "One channel's live events (Server-Sent Events)",
            stream_answer("the event stream"),
            tag="events",
            errors=("404", "429"),
            params=[
                LAST_EVENT_ID_HEADER,
                query(
                    "last_event_id",
                    {"type": "string", "pattern": "^[0-9]{1,19}$"},
                    "a message id to resume after",
                ),
                ACCESS_TOKEN,
            ],
            description=CHANNEL_STREAM,
        ),
    },
    "/events": {
        "get": op(
            "Several channels' live events on one stream (Server-Sent Events)",
            stream_answer("the event stream"),
            tag="events",
            errors=("404", "429"),
            params=[
                query(
                    "channels",
                    {"type": "string", "pattern": "^[0-9]+( *, *[0-9]+)*$"},
                    "comma-separated channel ids; absent: every membership, kept current",
                ),
                LAST_EVENT_ID_HEADER,
                query(
                    "last_event_id",
                    {"type": "string", "maxLength": 512},
                    "a cursor from this stream, or a message id",
                ),
                ACCESS_TOKEN,
            ],
            description=MULTI_STREAM,
        ),
    },
    "/channels/{channel_id}/delayed-messages": {
        "parameters": [CHANNEL_ID],
        "post": op(
            "Schedule a message for later",
            ok("202", "the delayed message", "DelayedMessage"),
            tag="delayed",
            body="NewDelayedMessage",
            errors=("404", "429"),
            description="Exactly one of `deliver_at` and `delay_seconds`. 429 "
            "`too_many_pending` over `HERALD_QUEUE_MAX_PER_USER`; 503 `queue_full` over "
            "`HERALD_QUEUE_MAX`; both with `Retry-After`.",
        ),
    },
    "/delayed-messages": {
        "get": op(
            "The caller's delayed messages, newest first",
            ok("200", "the delayed messages", "DelayedPage"),
            tag="delayed",
            params=[
                query("status", {"enum": list(STATUSES)}, "only this status"),
                limit(DELAYED_DEFAULT_LIMIT, MAX_LIMIT),
                query("before", ID, "only ids below this (page back)"),
            ],
        ),
    },
    "/delayed-messages/{delayed_id}": {
        "parameters": [path_param("delayed_id", "a delayed message id")],
        "delete": op(
            "Cancel a pending delayed message",
            ok("204", "cancelled"),
            tag="delayed",
            errors=("404", "409"),
            description="409 `not_pending`; someone else's: 404.",
        ),
    },
    "/channels/{channel_id}/attachments": {
        "parameters": [CHANNEL_ID],
        "post": op(
            "Upload a file (multipart field `file`)",
            ok("201", "the attachment", "Attachment"),
            tag="attachments",
            errors=("404", "413", "422", "507"),
            requestBody={
                "required": True,
                "content": {"multipart/form-data": {"schema": ref("Upload")}},
            },
            description="413 over `HERALD_MAX_UPLOAD_BYTES`; 507 `insufficient_storage` "
            "when the upload directory is full or read-only.",
        ),
    },
    "/attachments/{attachment_id}": {
        "parameters": [path_param("attachment_id", "an attachment id")],
        "get": op(
            "An attachment's metadata",
            ok("200", "the attachment", "Attachment"),
            tag="attachments",
            errors=("404",),
        ),
        "delete": op(
            "Delete an attachment (owner or admin)",
            ok("204", "deleted"),
            tag="attachments",
            errors=("403", "404", "409"),
            description="409 `path_rejected`: the stored path was refused (audited).",
        ),
    },
    "/attachments/{attachment_id}/content": {
        "parameters": [path_param("attachment_id", "an attachment id")],
        "get": op(
            "An attachment's bytes",
            {
                "200": {
                    "description": "the file, `Content-Disposition: attachment`, "
                    "`X-Content-Type-Options: nosniff`; scriptable types (html, xml, svg, "
                    "javascript) as application/octet-stream",
                    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                }
            },
            tag="attachments",
            errors=("404", "409"),
        ),
    },
    "/admin/audit": {
        "get": op(
            "The audit trail, newest first (admins)",
            ok("200", "audit entries", "AuditPage"),
            tag="admin",
            errors=("403",),
            params=[
                *(
                    query(name, {"type": "string", "maxLength": MAX_FILTER_CHARS}, "exact match")
                    for name in ("action", "target_type", "target_id")
                ),
                query(
                    "since",
                    {"type": "string", "maxLength": 64},
                    "RFC 3339, inclusive; no offset = UTC",
                ),
                query(
                    "until",
                    {"type": "string", "maxLength": 64},
                    "RFC 3339, exclusive; no offset = UTC",
                ),
                query("before", ID, "only ids below this (page back)"),
                limit(100, MAX_LIMIT),
            ],
        ),
    },
    "/admin/connections": {
        "get": op(
            "This process's SSE connections, oldest first (admins)",
            ok("200", "the connections", "ConnectionPage"),
            tag="admin",
            errors=("403",),
            params=[
                query("channel_id", ID, "only this channel's"),
                limit(1000, ADMIN_CONNECTIONS_MAX),
            ],
        ),
    },
}

_CRON_PARAMS = [
    query(
        "wait",
        {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_S, "default": 30},
        "seconds to wait for the run",
    )
]


def _cron(method: str) -> Schema:
    return op(
        f"Run the delayed-message cleanup ({method})",
        {
            **ok("200", "the finished run", "CronResult"),
            **ok("202", "not finished within `wait`", "CronResult"),
        },
        tag="cron",
        params=_CRON_PARAMS,
        errors=("401",),
        auth=False,
        security=[{"cronSecret": []}],
        description="Needs `Authorization: Bearer <CRON_SECRET>`, not a user token. "
        "503 `cron_disabled` when no secret is configured.",
    )


PATHS["/cron/cleanup-delayed-messages"] = {"get": _cron("GET"), "post": _cron("POST")}

# A malformed id in the path is a 422, whatever the operation.
for _item in PATHS.values():
    if "parameters" in _item:
        for _name, _op in _item.items():
            if _name != "parameters":
                _op["responses"].setdefault("422", r("Invalid"))

DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "info": {
        "title": "Herald",
        "version": "1",
        "description": "Real-time channel messaging: REST plus Server-Sent Events. Every "
        'error body is `{"error": {"code", "message"}}`; an unknown route answers 404 '
        "and a wrong method 405 (with `Allow`) before auth. Text lengths count "
        "characters. See docs/api.md.",
    },
    "servers": [{"url": API_PREFIX}],
    "security": [{"bearer": []}],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "responses": RESPONSES,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "a user token"},
            "cronSecret": {"type": "http", "scheme": "bearer", "description": "CRON_SECRET"},
        },
    },
}


@cache
def encoded() -> bytes:
    return json.dumps(DOCUMENT, separators=(",", ":")).encode()


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /api/v1/openapi.json``: no auth (the auth middleware lets it through)."""
    return web.Response(body=encoded(), content_type="application/json")
