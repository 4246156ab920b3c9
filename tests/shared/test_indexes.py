"""Every statement the foundation services run is index-backed at realistic volumes.

The statements are not copied here: the real services run against a seeded database
while a spy on ``Tx._run`` records each statement with its parameters; each one is then
EXPLAINed (FORMAT JSON) after ANALYZE and its plan checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared.bus import EventBus
from shared.db.monitor import normalise
from shared.db.pool import Database, Tx
from shared.metrics import Metrics
from shared.models import User
from shared.services.channels import DETAIL_SQL, LIST_SQL, MEMBERS_SQL, ChannelService
from shared.services.messages import MessageService
from shared.services.users import SEARCH_SQL, UserService
from shared.settings import Settings

TABLES = ("users", "api_tokens", "channels", "channel_members", "messages")
USERS, CHANNELS, PER_CHANNEL = 3000, 2000, 30

SEED = f"""
INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, {USERS}) g;
INSERT INTO api_tokens (user_id, token_hash)
SELECT g, sha256(('token-' || g)::bytea) FROM generate_series(1, {USERS}) g;
INSERT INTO channels (name, is_private, created_by)
SELECT 'c' || g, g %% 10 = 0, 1 + g %% {USERS} FROM generate_series(1, {CHANNELS}) g;
INSERT INTO channel_members (channel_id, user_id)
SELECT c.id, 1 + (c.id * 37 + k * 101) %% {USERS} FROM channels c, generate_series(1, 20) k
ON CONFLICT DO NOTHING;
INSERT INTO channel_members (channel_id, user_id)
SELECT id, 1 FROM channels WHERE id %% 3 = 0 ON CONFLICT DO NOTHING;
INSERT INTO messages (channel_id, author_id, body)
SELECT c.id, 1 + (c.id + g) %% {USERS}, 'body ' || g
FROM channels c, generate_series(1, {PER_CHANNEL}) g;
UPDATE channel_members SET last_read_message_id = channel_id * {PER_CHANNEL} - 10;
"""

# The indexes the 0001 tables have after every migration (name → definition fragment).
EXPECTED_INDEXES = {
    "users_pkey",
    "users_name_key",
    "users_name_prefix_idx",
    "api_tokens_pkey",
    "api_tokens_token_hash_key",
    "api_tokens_user_idx",
    "api_tokens_revoked_idx",
    "channels_pkey",
    "channels_name_key",
    "channel_members_pkey",
    "channel_members_user_idx",
    "messages_pkey",
    "messages_channel_id_idx",
}


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


async def explain(db: Database, sql: str, params: Any) -> list[dict[str, Any]]:
    raw = await db.fetchval("EXPLAIN (FORMAT JSON) " + sql, params)
    return list(plan_nodes(raw[0]["Plan"]))


def indexes_used(nodes: list[dict[str, Any]]) -> set[str]:
    return {n["Index Name"] for n in nodes if "Index Name" in n}


def seq_scans(nodes: list[dict[str, Any]]) -> set[str]:
    return {n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"}


@pytest.fixture
async def seeded(db: Database) -> Database:
    await db.execute(SEED)
    async with db.connection() as tx:  # autocommit: VACUUM refuses a transaction
        await tx.execute("VACUUM ANALYZE " + ", ".join(TABLES))
    return db


async def test_index_inventory_and_fillfactor(db: Database) -> None:
    rows = await db.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY(%s)",
        (list(TABLES),),
    )
    assert {r["indexname"] for r in rows} == EXPECTED_INDEXES
    options = await db.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'channel_members'")
    assert "fillfactor=90" in options


async def test_every_service_statement_uses_an_index(
    seeded: Database,
    settings: Settings,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = seeded
    captured: list[tuple[str, Any]] = []
    original = Tx._run

    async def spy(self: Tx, sql: str, params: Any) -> None:
        captured.append((sql, params))
        await original(self, sql, params)

    monkeypatch.setattr(Tx, "_run", spy)
    bus = EventBus(redis, settings)
    channels = ChannelService(db=db, bus=bus)  # no cache: the detail query must run
    messages = MessageService(db=db, bus=bus, metrics=Metrics.null())
    users = UserService(db=db)
    member = User(1, "u1", False)
    admin = User(2, "u2", True)
    cid = 990  # private (id % 10 == 0), and user 1 is a member (id % 3 == 0)

    cred = await users.authenticate("token-1")
    assert cred is not None and cred.user == member
    await channels.list_visible(member, limit=100, cursor=None)
    page = await channels.list_visible(member, limit=100, cursor=None)
    await channels.list_visible(member, limit=100, cursor=page["next_cursor"])
    await channels.list_visible(admin, limit=1000, cursor=None)
    await channels.get(member, cid)
    newest = await messages.page(member, cid, before=None, after=None, limit=50)
    await messages.page(member, cid, before=newest[10]["id"], after=None, limit=20)
    await messages.page(member, cid, before=None, after=newest[0]["id"] - 30, limit=20)
    await messages.since(cid, newest[0]["id"] - 5, 1000)
    await messages.newest_id(cid)
    await messages.post(member, cid, "hello")
    await channels.add_member(admin, cid, 3)
    await channels.remove_member(admin, cid, 3)
    await channels.update(admin, cid, name="renamed", topic=None)
    monkeypatch.setattr(Tx, "_run", original)

    shapes: dict[str, list[dict[str, Any]]] = {}
    failures = []
    for sql, params in captured:
        if sql in ("BEGIN", "COMMIT", "ROLLBACK"):
            continue
        nodes = await explain(db, sql, params)
        shapes.setdefault(normalise(sql), nodes)
        scanned = seq_scans(nodes) & set(TABLES)
        if scanned:
            failures.append(f"seq scan on {scanned}: {normalise(sql)[:160]}")
    assert not failures, "\n".join(failures)
    assert len(shapes) >= 12

    def used(fragment: str) -> set[str]:
        found = [nodes for text, nodes in shapes.items() if fragment in text]
        assert found, f"no statement like {fragment!r} ran"
        return set().union(*(indexes_used(nodes) for nodes in found))

    listing = used(normalise(LIST_SQL)[:120])
    assert {"channels_pkey", "channel_members_pkey", "messages_channel_id_idx"} <= listing
    assert used("WHERE t.token_hash = %s") >= {"api_tokens_token_hash_key", "users_pkey"}
    assert {"channels_pkey", "channel_members_pkey"} <= used(normalise(DETAIL_SQL)[:150])
    assert "messages_channel_id_idx" in used("ORDER BY m.id DESC LIMIT %s")
    assert "messages_channel_id_idx" in used("ORDER BY m.id ASC LIMIT %s")
    assert "messages_channel_id_idx" in used("ORDER BY m.id LIMIT %s")  # SSE replay
    assert "messages_channel_id_idx" in used("COALESCE(max(id), ?) FROM messages")
    # (channel_id, user_id) = one row: either composite index finds it directly.
    marker = used("UPDATE channel_members SET last_read_message_id")
    assert marker & {"channel_members_pkey", "channel_members_user_idx"}

    # Members by user: a user's memberships, and the listing's membership join for a
    # user in many channels (a merge or bitmap join on it, never a scan of the table).
    nodes = await explain(db, "SELECT channel_id FROM channel_members WHERE user_id = %s", (17,))
    assert "channel_members_user_idx" in indexes_used(nodes)
    nodes = await explain(
        db, LIST_SQL, {"user_id": 1, "after": 0, "is_admin": False, "limit": 1001}
    )
    assert "channel_members_user_idx" in indexes_used(nodes)
    assert not seq_scans(nodes) & set(TABLES)


def record_statements(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every statement run from now on, with its parameters (transaction control left out)."""
    captured: list[tuple[str, Any]] = []
    original = Tx._run

    async def spy(self: Tx, sql: str, params: Any) -> None:
        if sql not in ("BEGIN", "COMMIT", "ROLLBACK"):
            captured.append((sql, params))
        await original(self, sql, params)

    monkeypatch.setattr(Tx, "_run", spy)
    return captured


async def test_client_reads_use_indexes(
    seeded: Database,
    settings: Settings,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Members pages, user lookup by prefix and marking read (0007_client_reads.sql)."""
    db = seeded
    bus = EventBus(redis, settings)
    channels = ChannelService(db=db, bus=bus)
    messages = MessageService(db=db, bus=bus, metrics=Metrics.null())
    users = UserService(db=db)
    member = User(1, "u1", False)
    cid = 990  # private, user 1 a member; 21 members
    newest = await messages.newest_id(cid)
    captured = record_statements(monkeypatch)
    page = await channels.members(member, cid, limit=5, cursor=None)
    await channels.members(member, cid, limit=5, cursor=page["next_cursor"])
    wide = await users.search("U", limit=20)  # matches all 3000 users
    await users.search("u12", limit=20)
    await users.search("u1%_\\", limit=20)
    await messages.mark_read(member, cid, newest)
    monkeypatch.undo()
    assert [u["name"] for u in wide][:3] == ["u1", "u10", "u100"]  # byte order of lower()

    plans: dict[str, list[dict[str, Any]]] = {}
    for sql, params in captured:
        nodes = await explain(db, sql, params)
        assert not seq_scans(nodes) & set(TABLES), normalise(sql)[:160]
        plans.setdefault(sql, []).extend(nodes)
    assert "channel_members_pkey" in indexes_used(plans[MEMBERS_SQL])
    search = plans[SEARCH_SQL]
    assert "users_name_prefix_idx" in indexes_used(search)
    # The index gives the order: no sort, however many names match the prefix.
    assert not any(n["Node Type"] in ("Sort", "Incremental Sort") for n in search)
    (lookup,) = [nodes for sql, nodes in plans.items() if sql.startswith("SELECT 1 FROM messages")]
    # (channel_id, id) = one entry: an index-only probe of either index finds it.
    assert indexes_used(lookup) & {"messages_pkey", "messages_channel_id_idx"}
    (mark,) = [nodes for sql, nodes in plans.items() if sql.startswith("UPDATE channel_members")]
    assert indexes_used(mark) & {"channel_members_pkey", "channel_members_user_idx"}
