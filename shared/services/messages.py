"""Messages: posting (stored, then published), paging, and the reads live delivery
needs (heads under the posting locks, fills and replays across channels)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2.errors

from shared.bus import EventBus
from shared.constants import AdvisoryLock, channel_post_lock
from shared.db.pool import Database, Row, Tx
from shared.errors import Forbidden, NotFound
from shared.metrics import Metrics
from shared.models import MessageJson, User, message_json
from shared.services.channels import visible_channel

MESSAGE_COLUMNS = "m.id, m.channel_id, m.author_id, u.name AS author_name, m.body, m.created_at"
FEED_COLUMNS = MESSAGE_COLUMNS + ", m.prev_id"
MAX_BODY_CHARS = 10_000


@dataclass(frozen=True, slots=True)
class Posted:
    """A stored message and the id of the channel's message before it (0: none; None:
    unknown, for rows older than the column)."""

    message: MessageJson
    prev_id: int | None

    @property
    def id(self) -> int:
        return self.message["id"]

    @property
    def channel_id(self) -> int:
        return self.message["channel_id"]


def posted(row: Row) -> Posted:
    return Posted(message_json(row), row["prev_id"])


async def insert_message(
    db: Database | Tx, channel_id: int, author_id: int, body: str, *, is_admin: bool = False
) -> Posted:
    """Store a message in one statement and one round trip (migration 0009's
    ``herald_post_message``): visibility, the channel's posting lock, the INSERT with its
    ``prev_id``, the author's read mark. Given the Database it commits on its own, so
    the posting lock is held only while PostgreSQL works; given a Tx, until its COMMIT.
    404 when the channel does not exist or the author may not see it."""
    # Posts into one channel are serialised until COMMIT, so ids commit in id order.
    # Without it, a client replaying "everything after id N" between two concurrent
    # commits could see N+2 committed, move past it, and never get N+1.
    try:
        row = await db.fetchrow(
            "SELECT * FROM herald_post_message(%s, %s, %s, %s, %s, %s)",
            (channel_id, author_id, is_admin, body, *channel_post_lock(channel_id)),
        )
    except psycopg2.errors.ForeignKeyViolation:
        # The channel was deleted after the function saw it (a concurrent DELETE
        # committed in between): the same answer as if the delete had come first.
        row = None
    if row is None:
        raise NotFound("channel not found", code="channel_not_found")
    return posted(row)


async def insert_messages(tx: Tx, items: Sequence[tuple[int, int, str]]) -> list[Posted]:
    """Store many ``(channel_id, author_id, body)`` messages in one statement, ids in the
    order given (delayed delivery's batches); returns them in that order."""
    if not items:
        return []
    # Same per-channel ordering lock as insert_message, taken in channel order so two
    # batches wait for each other instead of deadlocking.
    for channel_id in sorted({c for c, _, _ in items}):
        await tx.execute(
            "SELECT pg_advisory_xact_lock(%s, %s)",
            (AdvisoryLock.CHANNEL_POST, channel_id % 2_147_483_647),
        )
    rows = await tx.fetch(
        "WITH m AS (INSERT INTO messages (channel_id, author_id, body)"
        "  SELECT c, a, b FROM unnest(%s::bigint[], %s::bigint[], %s::text[])"
        "    WITH ORDINALITY AS t(c, a, b, n) ORDER BY n"
        "  RETURNING *)"
        f" SELECT {MESSAGE_COLUMNS} FROM m JOIN users u ON u.id = m.author_id ORDER BY m.id",
        ([c for c, _, _ in items], [a for _, a, _ in items], [b for _, _, b in items]),
    )
    # Ids are drawn as the sorted rows are inserted; check rather than trust the mapping.
    if [(r["channel_id"], r["author_id"], r["body"]) for r in rows] != list(items):
        raise RuntimeError("batch insert returned rows out of order")
    # Each message's predecessor in its channel, read under the locks held above: the
    # channel's newest before the batch, then the batch's own ids in order.
    prev: dict[int, int] = {}
    channels = sorted({r["channel_id"] for r in rows})
    before = await tx.fetch(
        "SELECT t.c, COALESCE((SELECT max(m.id) FROM messages m"
        "  WHERE m.channel_id = t.c AND m.id < %s), 0) AS prev"
        " FROM unnest(%s::bigint[]) AS t(c)",
        (rows[0]["id"], channels),
    )
    last = {r["c"]: r["prev"] for r in before}
    for r in rows:
        r["prev_id"] = prev[r["id"]] = last[r["channel_id"]]
        last[r["channel_id"]] = r["id"]
    await tx.execute(
        "UPDATE messages m SET prev_id = t.p FROM unnest(%s::bigint[], %s::bigint[]) AS t(i, p)"
        " WHERE m.id = t.i",
        (list(prev), list(prev.values())),
    )
    newest: dict[tuple[int, int], int] = {}
    for r in rows:
        newest[(r["channel_id"], r["author_id"])] = r["id"]
    await tx.execute(
        "UPDATE channel_members cm SET last_read_message_id = t.mid"
        " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS t(c, a, mid)"
        " WHERE cm.channel_id = t.c AND cm.user_id = t.a AND cm.last_read_message_id < t.mid",
        ([c for c, _ in newest], [a for _, a in newest], list(newest.values())),
    )
    return [posted(r) for r in rows]


class MessageService:
    def __init__(self, *, db: Database, bus: EventBus, metrics: Metrics) -> None:
        self.db = db
        self.bus = bus
        self.metrics = metrics

    async def post(self, user: User, channel_id: int, body: str) -> MessageJson:
        """Store the message, commit, then publish it to every server process."""
        stored = await insert_message(self.db, channel_id, user.id, body, is_admin=user.is_admin)
        self.metrics.messages_posted.labels("rest").inc()
        await self.bus.message_posted(stored.message, stored.prev_id)
        return stored.message

    async def page(
        self,
        user: User,
        channel_id: int,
        *,
        before: int | None,
        after: int | None,
        limit: int,
    ) -> list[MessageJson]:
        """Messages in id order. With ``after``: the oldest after it; otherwise the newest
        (before ``before`` if given). Reading marks the channel read up to the newest seen."""
        async with self.db.connection() as tx:
            channel = await visible_channel(tx, user, channel_id)
            conds = ["m.channel_id = %s"]
            params: list[Any] = [channel_id]
            if before is not None:
                conds.append("m.id < %s")
                params.append(before)
            if after is not None:
                conds.append("m.id > %s")
                params.append(after)
            order = "ASC" if after is not None else "DESC"
            rows: list[Row] = await tx.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m JOIN users u ON u.id = m.author_id"
                f" WHERE {' AND '.join(conds)} ORDER BY m.id {order} LIMIT %s",
                (*params, limit),
            )
            rows.sort(key=lambda r: r["id"])
            if rows and channel["is_member"]:
                await tx.execute(
                    "UPDATE channel_members SET last_read_message_id = %s"
                    " WHERE channel_id = %s AND user_id = %s AND last_read_message_id < %s",
                    (rows[-1]["id"], channel_id, user.id, rows[-1]["id"]),
                )
        return [message_json(r) for r in rows]

    async def mark_read(self, user: User, channel_id: int, message_id: int) -> None:
        """Move the caller's read position in the channel forward to ``message_id``
        (never back). 404 for a channel they cannot see or a message not in it; 403 for
        a visible channel they are not a member of (only members have a position)."""
        async with self.db.connection() as tx:
            channel = await visible_channel(tx, user, channel_id)
            if not channel["is_member"]:
                raise Forbidden("only a member of the channel has a read position")
            found = await tx.fetchval(
                "SELECT 1 FROM messages WHERE id = %s AND channel_id = %s",
                (message_id, channel_id),
            )
            if found is None:
                raise NotFound("no such message in this channel", code="message_not_found")
            # The condition, not a read-then-write, keeps it monotonic: a concurrent mark
            # that committed first is re-checked against here (READ COMMITTED re-evaluates
            # the WHERE on the newest row version), so a lower id never overwrites it.
            # No cache entry holds read positions (shared/cache.py keeps the channel's
            # JSON and member ids), so there is nothing to invalidate.
            await tx.execute(
                "UPDATE channel_members SET last_read_message_id = %s"
                " WHERE channel_id = %s AND user_id = %s AND last_read_message_id < %s",
                (message_id, channel_id, user.id, message_id),
            )

    async def since(self, channel_id: int, after_id: int, limit: int) -> list[MessageJson]:
        """Up to ``limit`` messages with id > ``after_id``, oldest first (SSE replay)."""
        rows = await self.db.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages m JOIN users u ON u.id = m.author_id"
            " WHERE m.channel_id = %s AND m.id > %s ORDER BY m.id LIMIT %s",
            (channel_id, after_id, limit),
        )
        return [message_json(r) for r in rows]

    async def count_since(self, channel_id: int, after_id: int, cap: int) -> int:
        """How many messages have id > ``after_id``, counting no further than ``cap``
        (an index-only scan of at most ``cap`` entries)."""
        value = await self.db.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM messages"
            " WHERE channel_id = %s AND id > %s LIMIT %s) AS missed",
            (channel_id, after_id, cap),
        )
        return int(value)

    async def newest_id(self, channel_id: int) -> int:
        value = await self.db.fetchval(
            "SELECT COALESCE(max(id), 0) FROM messages WHERE channel_id = %s", (channel_id,)
        )
        return int(value)

    # -- what live delivery reads (server/sse/feeds.py, server/sse/replay.py) ----------

    async def heads(self, channel_ids: Sequence[int]) -> tuple[int, dict[int, int]]:
        """A watermark W and each channel's newest message id, such that every message
        of these channels with id <= W is committed and among what the heads cover, and
        every later one will have an id > W.

        The channels' posting locks are taken in shared mode first (sorted, as posters
        take them, so nobody deadlocks): that waits for the posts in flight, and a post
        after it draws its id after the sequence value read here."""
        ids = sorted(set(channel_ids))
        # One statement, one round trip (migration 0010's herald_channel_heads): the
        # locks, then the sequence, then the heads, each step after the one before.
        row = await self.db.fetchrow(
            "SELECT watermark, heads FROM herald_channel_heads(%s::bigint[], %s)",
            (ids, AdvisoryLock.CHANNEL_POST),
        )
        assert row is not None
        return int(row["watermark"]), dict(zip(ids, map(int, row["heads"]), strict=True))

    async def fill(self, after: Mapping[int, int], per_channel: int) -> list[Posted]:
        """For each channel, up to ``per_channel`` messages with id > its value, oldest
        first; all of them in id order (which keeps each channel's order)."""
        if not after:
            return []
        rows = await self.db.fetch(
            "SELECT x.* FROM unnest(%s::bigint[], %s::bigint[]) AS t(c, a)"
            " CROSS JOIN LATERAL ("
            f"  SELECT {FEED_COLUMNS} FROM messages m JOIN users u ON u.id = m.author_id"
            "   WHERE m.channel_id = t.c AND m.id > t.a ORDER BY m.id LIMIT %s) AS x"
            " ORDER BY x.id",
            (list(after), list(after.values()), per_channel),
        )
        return [posted(r) for r in rows]

    async def count_between(
        self, ranges: Mapping[int, tuple[int, int]], cap: int
    ) -> dict[int, int]:
        """For each channel ``c: (after, upto)``, how many messages have after < id <=
        upto, counting no further than ``cap`` (index-only, at most ``cap`` entries each)."""
        if not ranges:
            return {}
        rows = await self.db.fetch(
            "SELECT t.c, (SELECT count(*) FROM (SELECT 1 FROM messages m"
            "   WHERE m.channel_id = t.c AND m.id > t.a AND m.id <= t.u LIMIT %s) AS x) AS n"
            " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS t(c, a, u)",
            (
                cap,
                list(ranges),
                [a for a, _ in ranges.values()],
                [u for _, u in ranges.values()],
            ),
        )
        return {int(r["c"]): int(r["n"]) for r in rows}

    async def between(
        self, ranges: Mapping[int, tuple[int, int]], after_id: int, limit: int
    ) -> list[MessageJson]:
        """A page of the messages in every channel's ``(after, upto]`` with id >
        ``after_id``, in id order (replay of several channels, page by page)."""
        if not ranges:
            return []
        rows = await self.db.fetch(
            f"SELECT {MESSAGE_COLUMNS}"
            " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS t(c, a, u)"
            " JOIN messages m ON m.channel_id = t.c AND m.id > t.a AND m.id <= t.u"
            " JOIN users u ON u.id = m.author_id"
            " WHERE m.id > %s ORDER BY m.id LIMIT %s",
            (
                list(ranges),
                [a for a, _ in ranges.values()],
                [u for _, u in ranges.values()],
                after_id,
                limit,
            ),
        )
        return [message_json(r) for r in rows]
