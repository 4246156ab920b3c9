"""Value objects and their JSON shapes (what the REST API and SSE events carry)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict


def iso(ts: datetime | None) -> str | None:
    """RFC 3339 with a ``Z`` for UTC."""
    if ts is None:
        return None
    return ts.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    is_admin: bool

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "is_admin": self.is_admin}


@dataclass(frozen=True, slots=True)
class Credential:
    """Who a request's token says it is: the user, which of its tokens, and when that
    token expires (unix seconds; None: never). Streams keep it to end with the token."""

    user: User
    token_id: int
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def may_see_channel(user: User, *, is_private: bool, is_member: bool) -> bool:
    """The visibility rule: a public channel is everyone's; a private one is seen by its
    members and admins only. (The channel listing's SQL states the same rule.)"""
    return not is_private or is_member or user.is_admin


class AuthorJson(TypedDict):
    id: int
    name: str


class MessageJson(TypedDict):
    """The message object of the REST API and of SSE ``message`` events."""

    id: int
    channel_id: int
    author: AuthorJson
    body: str
    created_at: str | None


def message_json(row: dict[str, Any]) -> MessageJson:
    """A message row (with ``author_name``) as the API shows it."""
    return {
        "id": row["id"],
        "channel_id": row["channel_id"],
        "author": {"id": row["author_id"], "name": row["author_name"]},
        "body": row["body"],
        "created_at": iso(row["created_at"]),
    }


def channel_json(row: dict[str, Any]) -> dict[str, Any]:
    """A channel row as the API shows it; list-only fields appear when present."""
    out: dict[str, Any] = {
        "id": row["id"],
        "name": row["name"],
        "topic": row["topic"],
        "is_private": row["is_private"],
        "created_by": row["created_by"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }
    if "member_count" in row:
        out["member_count"] = row["member_count"]
    return out
