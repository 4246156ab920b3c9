"""Query benchmark: the channel listing and detail against a naive N+1 loader.

Seeds a throw-away database (1000 channels with members, messages and read markers),
starts the real app in-process, and measures over HTTP, in one run:

* ``GET /api/v1/channels?limit=1000`` (one LATERAL statement) against a naive loader
  kept here only as the reference row (one query for the page, then member count, last
  message and unread count per channel: 1 + 3 N statements) — same auth, same JSON;
* ``GET /api/v1/channels/{id}`` uncached (entry dropped before each request) and cached;
* message pages with authors at two page sizes (the statement count must not move);
* ``EXPLAIN (ANALYZE, BUFFERS)`` of the listing and of the naive per-channel statements.

Statement counts come from the app's own query monitor (shared/db/monitor.py): the
statements each request's scope ran, so the app's background loops do not blur them.

Run: ``.venv/bin/python bench/queries.py`` (about half a minute). Options: ``--channels``,
``--messages``, ``--requests``, ``--naive-requests``, ``--no-plans``, ``--keep-db``.
Environment: ``HERALD_BENCH_PG`` (an admin DSN; default
postgresql://postgres@127.0.0.1:5432/postgres) and ``HERALD_BENCH_REDIS`` (default
redis://127.0.0.1:6379/14, flushed at start and at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from server.app import init_app
from server.keys import CACHE, DB, USERS
from server.middlewares import current_user
from shared.db.migrate import migrate
from shared.db.pool import Database, create_pool
from shared.models import User, channel_json, iso
from shared.services.channels import CHANNEL_COLUMNS, LIST_SQL
from shared.settings import Settings
from tests.scratchdb import admin_exec as scratch_exec

ADMIN_DSN = os.environ.get("HERALD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HERALD_BENCH_REDIS", "redis://127.0.0.1:6379/14")
DB_NAME = f"herald_bench_{os.getpid()}"

SEED_SQL = """
INSERT INTO users (name) SELECT 'seed' || g FROM generate_series(1, %(users)s) g;
INSERT INTO api_tokens (user_id, token_hash)
SELECT id, sha256(('seed-token-' || id)::bytea) FROM users WHERE name LIKE 'seed%%';

INSERT INTO channels (name, topic, is_private, created_by)
SELECT 'chan-' || g, 'topic of channel ' || g, g %% 10 = 0, 1 + (g * 7919) %% %(users)s
FROM generate_series(1, %(channels)s) g;

-- About 25 members per channel.
INSERT INTO channel_members (channel_id, user_id)
SELECT c.id, u.id FROM channels c JOIN users u ON u.id <> %(me)s
WHERE u.name LIKE 'seed%%' AND random() < 25.0 / %(users)s
ON CONFLICT DO NOTHING;

-- The bench user is in every private channel and in 60 %% of the public ones.
INSERT INTO channel_members (channel_id, user_id)
SELECT c.id, %(me)s FROM channels c WHERE c.is_private OR random() < 0.6
ON CONFLICT DO NOTHING;

-- Messages, authors among the seeded users.
INSERT INTO messages (channel_id, author_id, body, created_at)
SELECT c.id, 1 + (c.id * 31 + g) %% %(users)s, 'message ' || g || ' in ' || c.name,
       now() - (%(messages)s - g) * interval '1 minute'
FROM channels c CROSS JOIN generate_series(1, %(messages)s) g;

-- Read markers somewhere inside each channel's history (so unread counts vary).
UPDATE channel_members cm
SET last_read_message_id = COALESCE((
    SELECT m.id FROM messages m WHERE m.channel_id = cm.channel_id
    ORDER BY m.id OFFSET floor(random() * %(messages)s)::int LIMIT 1), 0);
"""

# The reference N+1 loader: one query for the page, then three per channel.
NAIVE_PAGE_SQL = f"""
SELECT {CHANNEL_COLUMNS}, (me.user_id IS NOT NULL) AS is_member, me.last_read_message_id
FROM channels c
LEFT JOIN channel_members me ON me.channel_id = c.id AND me.user_id = %(user_id)s
WHERE c.id > %(after)s AND (NOT c.is_private OR me.user_id IS NOT NULL OR %(is_admin)s)
ORDER BY c.id LIMIT %(limit)s
"""
NAIVE_COUNT_SQL = "SELECT count(*) FROM channel_members WHERE channel_id = %s"
NAIVE_LAST_SQL = (
    "SELECT m.id, m.body, m.created_at, m.author_id, u.name AS author_name"
    " FROM messages m JOIN users u ON u.id = m.author_id"
    " WHERE m.channel_id = %s ORDER BY m.id DESC LIMIT 1"
)
NAIVE_UNREAD_SQL = "SELECT count(*) FROM messages WHERE channel_id = %s AND id > %s"


async def naive_listing(db: Database, user: User, limit: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        NAIVE_PAGE_SQL,
        {"user_id": user.id, "after": 0, "is_admin": user.is_admin, "limit": limit},
    )
    items = []
    for row in rows:
        out = channel_json(row)
        out["member_count"] = await db.fetchval(NAIVE_COUNT_SQL, (row["id"],))
        last = await db.fetchrow(NAIVE_LAST_SQL, (row["id"],))
        out["last_message"] = (
            None
            if last is None
            else {
                "id": last["id"],
                "channel_id": row["id"],
                "author": {"id": last["author_id"], "name": last["author_name"]},
                "body": last["body"],
                "created_at": iso(last["created_at"]),
            }
        )
        unread = await db.fetchval(NAIVE_UNREAD_SQL, (row["id"], row["last_read_message_id"] or 0))
        out["unread_count"] = unread if row["is_member"] else 0
        items.append(out)
    return items


async def naive_handler(request: web.Request) -> web.Response:
    user = current_user(request)
    limit = int(request.query.get("limit", "100"))
    items = await naive_listing(request.app[DB], user, limit)
    return web.json_response({"items": items, "next_cursor": None})


def admin_exec(sql: str) -> None:
    scratch_exec(ADMIN_DSN, sql)


def db_dsn() -> str:
    return f"{ADMIN_DSN.rpartition('/')[0]}/{DB_NAME}"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


class Runner:
    def __init__(self, session: aiohttp.ClientSession, base: str, app: web.Application):
        self.session = session
        self.base = base
        self.app = app

    @property
    def queries(self) -> int:
        monitor = self.app[DB].monitor
        assert monitor is not None
        return monitor.request_statements_total

    async def measure(
        self, path: str, headers: dict[str, str], n: int, before: Any = None
    ) -> dict[str, Any]:
        """``n`` sequential requests: latency (ms) and statements per request."""
        lat: list[float] = []
        counts: list[int] = []
        body: Any = None
        for _ in range(n):
            if before is not None:
                await before()
            q0 = self.queries
            t0 = time.perf_counter()
            async with self.session.get(self.base + path, headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 200, (resp.status, body)
            lat.append((time.perf_counter() - t0) * 1000)
            counts.append(self.queries - q0)
        return {
            "p50": statistics.median(lat),
            "p99": pct(lat, 99),
            "mean": statistics.fmean(lat),
            "queries": max(counts),
            "queries_min": min(counts),
            "body": body,
        }


def row(label: str, r: dict[str, Any], ref: dict[str, Any] | None = None) -> str:
    ratio = ""
    if ref is not None:
        share = r["p50"] / ref["p50"]
        ratio = f"  p50 x{share:.3f} ({(1 - share) * 100:.1f}% lower)"
    q = r["queries"] if r["queries"] == r["queries_min"] else f"{r['queries_min']}-{r['queries']}"
    return f"  {label:<44} {q!s:>6} {r['p50']:9.2f} {r['p99']:9.2f}{ratio}"


async def explain(db: Database, sql: str, params: Any) -> str:
    rows = await db.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
    return "\n".join(next(iter(r.values())) for r in rows)


async def run(args: argparse.Namespace) -> None:
    admin_exec(f'DROP DATABASE IF EXISTS "{DB_NAME}"')
    admin_exec(f'CREATE DATABASE "{DB_NAME}"')
    rc = aioredis.Redis.from_url(REDIS_URL)
    await rc.flushdb()
    tmp = tempfile.TemporaryDirectory()
    settings = replace(
        Settings.from_env(env={}, dotenv=None),
        database_url=db_dsn(),
        redis_url=REDIS_URL,
        upload_dir=Path(tmp.name),
    )
    runner: web.AppRunner | None = None
    try:
        db = Database(await create_pool(settings.database_url, maxsize=2))
        await migrate(db)
        app = init_app(settings)
        app.router.add_get("/api/v1/bench/naive-channels", naive_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        user, token = await app[USERS].create("bench-user")
        t0 = time.perf_counter()
        await db.execute(
            SEED_SQL,
            {"users": 500, "channels": args.channels, "messages": args.messages, "me": user.id},
        )
        async with db.connection() as tx:  # autocommit: VACUUM cannot run in a transaction
            await tx.execute("VACUUM ANALYZE")
        counts = await db.fetchrow(
            "SELECT (SELECT count(*) FROM channels) AS channels,"
            " (SELECT count(*) FROM channel_members) AS members,"
            " (SELECT count(*) FROM messages) AS messages"
        )
        assert counts is not None
        print(
            f"seeded {counts['channels']} channels, {counts['members']} memberships,"
            f" {counts['messages']} messages in {time.perf_counter() - t0:.1f}s"
        )
        headers = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{port}"
        limit = args.channels
        async with aiohttp.ClientSession() as session:
            r = Runner(session, base, app)
            list_path = f"/api/v1/channels?limit={limit}"
            naive_path = f"/api/v1/bench/naive-channels?limit={limit}"
            # Warm up: caches, the token entry, plan caches, connections.
            await r.measure(list_path, headers, 3)
            await r.measure(naive_path, headers, 1)
            opt = await r.measure(list_path, headers, args.requests)
            naive = await r.measure(naive_path, headers, args.naive_requests)
            opt_items = opt.pop("body")["items"]
            naive_items = naive.pop("body")["items"]
            same = opt_items == naive_items
            channel_id = opt_items[len(opt_items) // 2]["id"]
            detail_path = f"/api/v1/channels/{channel_id}"

            async def drop_entry() -> None:
                await app[CACHE].invalidate_channel(channel_id)

            uncached = await r.measure(detail_path, headers, args.requests, before=drop_entry)
            cached = await r.measure(detail_path, headers, args.requests * 4)
            msgs50 = await r.measure(f"{detail_path}/messages?limit=50", headers, args.requests)
            msgs500 = await r.measure(f"{detail_path}/messages?limit=500", headers, args.requests)
            small = await r.measure("/api/v1/channels?limit=10", headers, args.requests)
        print(f"\nHTTP, sequential requests, bench user sees {len(opt_items)} channels")
        print(f"  {'request':<44} {'stmts':>6} {'p50 ms':>9} {'p99 ms':>9}")
        print(row(f"naive N+1 listing, limit={limit} (reference)", naive))
        print(row(f"GET /channels?limit={limit}", opt, naive))
        print(row("GET /channels?limit=10", small))
        print(row("GET /channels/{id}, entry dropped first", uncached))
        print(row("GET /channels/{id}, cached", cached))
        print(row("GET /channels/{id}/messages?limit=50", msgs50))
        print(row("GET /channels/{id}/messages?limit=500", msgs500))
        fewer = (1 - opt["queries"] / naive["queries"]) * 100
        print(
            f"\nlisting: {opt['queries']} statement(s) vs {naive['queries']} naive"
            f" ({fewer:.2f}% fewer); p50 {opt['p50']:.1f} ms vs {naive['p50']:.1f} ms"
            f" ({(1 - opt['p50'] / naive['p50']) * 100:.1f}% lower); p99 {opt['p99']:.1f} ms"
            f" vs {naive['p99']:.1f} ms; same JSON as naive: {same}"
        )
        print(f"cached detail: {cached['queries']} statements per request")
        print("(statement counts include auth: 0 once the token is cached)")
        if args.plans:
            params = {"user_id": user.id, "after": 0, "is_admin": False, "limit": limit + 1}
            print("\n== EXPLAIN (ANALYZE, BUFFERS) listing, limit", limit)
            print(await explain(db, LIST_SQL, params))
            mid = await db.fetchrow(
                "SELECT channel_id, last_read_message_id FROM channel_members"
                " WHERE user_id = %s ORDER BY channel_id OFFSET 500 LIMIT 1",
                (user.id,),
            )
            assert mid is not None
            cid, read = mid["channel_id"], mid["last_read_message_id"]
            print("\n== naive, per channel: member count")
            print(await explain(db, NAIVE_COUNT_SQL, (cid,)))
            print("\n== naive, per channel: last message")
            print(await explain(db, NAIVE_LAST_SQL, (cid,)))
            print("\n== naive, per channel: unread count")
            print(await explain(db, NAIVE_UNREAD_SQL, (cid, read)))
        await db.close()
    finally:
        if runner is not None:
            await runner.cleanup()
        await rc.flushdb()
        await rc.aclose()
        tmp.cleanup()
        if args.keep_db:
            print(f"kept database {DB_NAME}")
        else:
            admin_exec(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50, help="messages per channel")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--naive-requests", type=int, default=20)
    parser.add_argument("--no-plans", dest="plans", action="store_false")
    parser.add_argument("--keep-db", action="store_true", help="keep the seeded database")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
