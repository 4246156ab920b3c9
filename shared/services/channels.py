"""Channels and their members: creation, visibility, listing, changes."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import psycopg2.errors

from shared.bus import EventBus
from shared.cache import ChannelEntry, MetadataCache
from shared.db.pool import Database, Row, Tx
from shared.errors import Conflict, Forbidden, NotFound, ValidationError
from shared.models import User, channel_json, iso, may_see_channel

CHANNEL_COLUMNS = "c.id, c.name, c.topic, c.is_private, c.created_by, c.created_at, c.updated_at"

# One statement for a whole page of the listing, however long: member counts, the newest
# message with its author and the caller's unread count come from LATERAL subqueries
# that each use an index (channel_members pkey, messages (channel_id, id)).
LIST_SQL = f"""
SELECT {CHANNEL_COLUMNS},
       mc.member_count,
       me.last_read_message_id,
       (me.user_id IS NOT NULL) AS is_member,
       lm.id AS lm_id, lm.body AS lm_body, lm.created_at AS lm_created_at,
       lm.author_id AS lm_author_id, lm.author_name AS lm_author_name,
       COALESCE(uc.unread_count, 0) AS unread_count
FROM channels c
LEFT JOIN channel_members me ON me.channel_id = c.id AND me.user_id = %(user_id)s
CROSS JOIN LATERAL (
    SELECT count(*) AS member_count FROM channel_members m WHERE m.channel_id = c.id
) mc
LEFT JOIN LATERAL (
    SELECT m.id, m.body, m.created_at, m.author_id, u.name AS author_name
    FROM messages m JOIN users u ON u.id = m.author_id
    WHERE m.channel_id = c.id ORDER BY m.id DESC LIMIT 1
) lm ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS unread_count FROM messages m
    WHERE me.user_id IS NOT NULL AND m.channel_id = c.id AND m.id > me.last_read_message_id
) uc ON true
WHERE c.id > %(after)s
  -- may_see_channel (shared/models.py), in SQL
  AND (NOT c.is_private OR me.user_id IS NOT NULL OR %(is_admin)s)
ORDER BY c.id
LIMIT %(limit)s
"""


# One statement for the detail and its cache entry: the row, its member count and, for
# a private channel, who may see it (so a cached entry can answer visibility alone).
DETAIL_SQL = f"""
SELECT {CHANNEL_COLUMNS},
       (SELECT count(*) FROM channel_members m WHERE m.channel_id = c.id) AS member_count,
       CASE WHEN c.is_private
            THEN ARRAY(SELECT m.user_id FROM channel_members m WHERE m.channel_id = c.id)
       END AS member_ids
FROM channels c
WHERE c.id = %s
"""


# A page of a channel's members in user id order: the channel_members pkey
# (channel_id, user_id) gives the order and the cursor's start, users pkey the names.
MEMBERS_SQL = """
SELECT m.user_id, u.name, m.joined_at, m.last_read_message_id
FROM channel_members m JOIN users u ON u.id = m.user_id
WHERE m.channel_id = %(channel_id)s AND m.user_id > %(after)s
ORDER BY m.user_id
LIMIT %(limit)s
"""


# Cursor kinds: a listing's cursor is refused by another listing (422), not misread.
CHANNELS_CURSOR = "c"
MEMBERS_CURSOR = "m"


def encode_cursor(last_id: int, kind: str = CHANNELS_CURSOR) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, kind: str = CHANNELS_CURSOR) -> int:
    """The id a page starts after (0 without a cursor); 422 for anything we did not write."""
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValidationError("cursor: invalid") from None
    found, _, value = raw.partition(":")
    if found != kind or not value.isdigit() or len(value) > 19:
        raise ValidationError("cursor: invalid")
    return int(value)


def listing_json(row: Row) -> dict[str, Any]:
    out = channel_json(row)
    out["last_message"] = (
        None
        if row["lm_id"] is None
        else {
            "id": row["lm_id"],
            "channel_id": row["id"],
            "author": {"id": row["lm_author_id"], "name": row["lm_author_name"]},
            "body": row["lm_body"],
            "created_at": iso(row["lm_created_at"]),
        }
    )
    out["unread_count"] = row["unread_count"]
    return out


async def visible_channel(tx: Tx, user: User, channel_id: int, *, lock: bool = False) -> Row:
    """The channel row plus ``is_member``; 404 when it does not exist or is private to
    others (its existence is not leaked). Posting checks the same rule inside
    PostgreSQL (``herald_post_message``, migration 0009)."""
    row = await tx.fetchrow(
        f"SELECT {CHANNEL_COLUMNS}, (m.user_id IS NOT NULL) AS is_member"
        " FROM channels c LEFT JOIN channel_members m"
        "   ON m.channel_id = c.id AND m.user_id = %s"
        " WHERE c.id = %s" + (" FOR UPDATE OF c" if lock else ""),
        (user.id, channel_id),
    )
    if row is None or not may_see_channel(
        user, is_private=row["is_private"], is_member=row["is_member"]
    ):
        raise NotFound("channel not found", code="channel_not_found")
    return row


def require_manager(user: User, channel: Row) -> None:
    if channel["created_by"] != user.id and not user.is_admin:
        raise Forbidden("only the channel's creator or an admin may do this")


class ChannelService:
    def __init__(self, *, db: Database, bus: EventBus, cache: MetadataCache | None = None) -> None:
        self.db = db
        self.bus = bus
        self.cache = cache

    async def _invalidate(self, channel_id: int) -> None:
        # After the commit, never before: see shared/cache.py for why that order matters.
        if self.cache is not None:
            await self.cache.invalidate_channel(channel_id)

    async def create(self, user: User, name: str, topic: str, is_private: bool) -> dict[str, Any]:
        """Create a channel; its creator becomes its first member."""
        try:
            async with self.db.transaction() as tx:
                row = await tx.fetchrow(
                    "INSERT INTO channels (name, topic, is_private, created_by)"
                    " VALUES (%s, %s, %s, %s) RETURNING *",
                    (name, topic, is_private, user.id),
                )
                assert row is not None
                await tx.execute(
                    "INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                    (row["id"], user.id),
                )
        except psycopg2.errors.UniqueViolation:
            raise Conflict(f"channel name {name!r} is taken", code="name_taken") from None
        await self._invalidate(row["id"])  # a "no such channel" entry for this id may exist
        row["member_count"] = 1
        return channel_json(row)

    async def list_visible(self, user: User, *, limit: int, cursor: str | None) -> dict[str, Any]:
        """A page of the channels the user can see, in id order, in one query."""
        after = decode_cursor(cursor)
        rows = await self.db.fetch(
            LIST_SQL,
            {"user_id": user.id, "after": after, "is_admin": user.is_admin, "limit": limit + 1},
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "items": [listing_json(r) for r in rows],
            "next_cursor": encode_cursor(rows[-1]["id"]) if more and rows else None,
        }

    async def members(
        self, user: User, channel_id: int, *, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        """A page of the channel's members in user id order; 404 when the caller cannot
        see the channel."""
        after = decode_cursor(cursor, MEMBERS_CURSOR)
        async with self.db.connection() as tx:
            await visible_channel(tx, user, channel_id)
            rows = await tx.fetch(
                MEMBERS_SQL, {"channel_id": channel_id, "after": after, "limit": limit + 1}
            )
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "items": [
                {
                    "user_id": r["user_id"],
                    "name": r["name"],
                    "joined_at": iso(r["joined_at"]),
                    "last_read_id": r["last_read_message_id"],
                }
                for r in rows
            ],
            "next_cursor": (
                encode_cursor(rows[-1]["user_id"], MEMBERS_CURSOR) if more and rows else None
            ),
        }

    async def get(self, user: User, channel_id: int) -> dict[str, Any]:
        """The channel's detail, from the Redis cache when it has it; 404 when missing or
        private to others."""

        async def load() -> ChannelEntry:
            row = await self.db.fetchrow(DETAIL_SQL, (channel_id,))
            if row is None:
                return ChannelEntry(None)
            members = frozenset(row.pop("member_ids") or ())
            return ChannelEntry(channel_json(row), members)

        if self.cache is not None:
            channel = await self.cache.channel_for(channel_id, user, load)
        else:
            channel = (await load()).visible_to(user)
        if channel is None:
            raise NotFound("channel not found", code="channel_not_found")
        return channel

    async def visible_ids(self, user: User, channel_ids: list[int]) -> set[int]:
        """Which of these channels the user may see (one statement)."""
        rows = await self.db.fetch(
            "SELECT c.id FROM channels c WHERE c.id = ANY(%s::bigint[])"
            " AND (NOT c.is_private OR %s OR EXISTS (SELECT 1 FROM channel_members m"
            "   WHERE m.channel_id = c.id AND m.user_id = %s))",
            (channel_ids, user.is_admin, user.id),
        )
        return {int(r["id"]) for r in rows}

    async def lost_access(self, follows: list[tuple[int, int, bool]]) -> set[tuple[int, int]]:
        """Of ``(channel, user, needs membership)`` follows, those that no longer hold:
        the channel is gone, or the user is not a member where that is needed, or may
        not see it (private, not a member, not an admin). In chunks of 5,000."""
        lost: set[tuple[int, int]] = set()
        for start in range(0, len(follows), 5000):
            chunk = follows[start : start + 5000]
            rows = await self.db.fetch(
                "SELECT t.c, t.u FROM unnest(%s::bigint[], %s::bigint[], %s::bool[])"
                "  AS t(c, u, member_only)"
                " LEFT JOIN channels ch ON ch.id = t.c"
                " LEFT JOIN users us ON us.id = t.u"
                " LEFT JOIN channel_members m ON m.channel_id = t.c AND m.user_id = t.u"
                " WHERE ch.id IS NULL OR us.id IS NULL"
                "  OR (m.user_id IS NULL AND (t.member_only"
                "      OR (ch.is_private AND NOT us.is_admin)))",
                ([c for c, _, _ in chunk], [u for _, u, _ in chunk], [m for _, _, m in chunk]),
            )
            lost |= {(int(r["c"]), int(r["u"])) for r in rows}
        return lost

    async def member_ids(self, user: User) -> list[int]:
        """The channels the user is a member of, by id."""
        rows = await self.db.fetch(
            "SELECT channel_id FROM channel_members WHERE user_id = %s ORDER BY channel_id",
            (user.id,),
        )
        return [int(r["channel_id"]) for r in rows]

    async def update(
        self, user: User, channel_id: int, *, name: str | None, topic: str | None
    ) -> dict[str, Any]:
        try:
            async with self.db.transaction() as tx:
                row = await visible_channel(tx, user, channel_id, lock=True)
                require_manager(user, row)
                updated = await tx.fetchrow(
                    "UPDATE channels SET name = COALESCE(%s, name), topic = COALESCE(%s, topic),"
                    " updated_at = now() WHERE id = %s RETURNING *",
                    (name, topic, channel_id),
                )
                assert updated is not None
                row = updated
                row["member_count"] = await tx.fetchval(
                    "SELECT count(*) FROM channel_members WHERE channel_id = %s", (channel_id,)
                )
        except psycopg2.errors.UniqueViolation:
            raise Conflict(f"channel name {name!r} is taken", code="name_taken") from None
        await self._invalidate(channel_id)
        return channel_json(row)

    async def delete(self, user: User, channel_id: int) -> None:
        async with self.db.transaction() as tx:
            row = await visible_channel(tx, user, channel_id, lock=True)
            require_manager(user, row)
            await tx.execute("DELETE FROM channels WHERE id = %s", (channel_id,))
        await self._invalidate(channel_id)
        await self.bus.channel_deleted(channel_id)

    async def add_member(self, user: User, channel_id: int, member_id: int) -> None:
        """Creator or admin adds anyone; anyone may join a public channel themselves."""
        async with self.db.transaction() as tx:
            row = await visible_channel(tx, user, channel_id)
            if not (member_id == user.id and not row["is_private"]):
                require_manager(user, row)
            exists = await tx.fetchval("SELECT 1 FROM users WHERE id = %s", (member_id,))
            if exists is None:
                raise NotFound("user not found", code="user_not_found")
            try:
                joined = await tx.fetchrow(
                    "INSERT INTO channel_members (channel_id, user_id, last_read_message_id)"
                    " VALUES (%s, %s,"
                    "   COALESCE((SELECT max(id) FROM messages WHERE channel_id = %s), 0))"
                    " ON CONFLICT DO NOTHING RETURNING last_read_message_id",
                    (channel_id, member_id, channel_id),
                )
            except psycopg2.errors.ForeignKeyViolation:
                # A concurrent DELETE of the channel committed after our check.
                raise NotFound("channel not found", code="channel_not_found") from None
        await self._invalidate(channel_id)
        if joined is not None:
            # Streams that follow the user's memberships add the channel from here on.
            await self.bus.member_added(channel_id, member_id, joined["last_read_message_id"])

    async def remove_member(self, user: User, channel_id: int, member_id: int) -> None:
        """Creator or admin removes anyone; a member may leave. Open streams are revoked."""
        async with self.db.transaction() as tx:
            row = await visible_channel(tx, user, channel_id)
            if member_id != user.id:
                require_manager(user, row)
            deleted = await tx.execute(
                "DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
                (channel_id, member_id),
            )
            if deleted == 0:
                raise NotFound("not a member of this channel", code="member_not_found")
        await self._invalidate(channel_id)
        await self.bus.member_removed(channel_id, member_id)
