"""PostgreSQL frozen (SIGSTOP on every process of an own throwaway cluster) and then
stopped, under a real ``herald serve`` with HERALD_BACKEND_TIMEOUT_S=1: requests that
need it answer 503 ``service_unavailable`` with Retry-After within the timeout + 1 s,
never 500; /health answers within the bound; after SIGCONT and after a restart the
same server process serves again by itself.
"""

from __future__ import annotations

import asyncio

import aiohttp

from shared.db.migrate import migrate
from shared.db.pool import Database, create_pool
from tests.faults.backend_procs import herald_cli, pg_cluster, timed, token_of, until_status
from tests.faults.delivery_procs import cluster
from tests.helpers import API

BACKEND_S = 1.0
BOUND_S = BACKEND_S + 1.0


async def _requests(s: aiohttp.ClientSession, base: str, auth: dict[str, str], channel: int):
    """The answers that need PostgreSQL: a listing and a post (plus /health)."""
    listing = await timed(s, "GET", f"{base}{API}/channels", headers=auth)
    post = await timed(
        s, "POST", f"{base}{API}/channels/{channel}/messages", json={"body": "x"}, headers=auth
    )
    health = await timed(s, "GET", f"{base}/health")
    return listing, post, health


def _assert_unavailable(*answers) -> None:
    for a in answers:
        assert a.seconds < BOUND_S, a
        assert a.status == 503, a
        assert a.body["error"]["code"] == "service_unavailable", a
        assert int(a.headers["Retry-After"]) >= 1, a
        assert "request id" in a.body["error"]["message"], a


async def test_frozen_then_stopped_postgres_answers_503_in_time(tmp_path):
    async with pg_cluster() as pg, cluster(pg.dsn(), tmp_path) as procs:
        url = pg.create_database("herald")
        db = Database(await create_pool(url, maxsize=1))
        try:
            await migrate(db)
        finally:
            await db.close()
        env = procs.env(DATABASE_URL=url)
        token = token_of(await asyncio.to_thread(herald_cli, env, "users", "create", "alice"))
        server = await procs.serve(DATABASE_URL=url, HERALD_BACKEND_TIMEOUT_S=str(BACKEND_S))
        base, auth = server.url, {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as s:
            made = await timed(s, "POST", f"{base}{API}/channels", json={"name": "c"}, headers=auth)
            assert made.status == 201, made.body
            channel = made.body["id"]

            pg.freeze()
            try:
                frozen = await _requests(s, base, auth, channel)
            finally:
                pg.thaw()
            print("frozen:", ", ".join(f"{a.status} {a.seconds:.2f}s" for a in frozen))
            _assert_unavailable(*frozen[:2])
            assert frozen[2].seconds < BOUND_S and frozen[2].status == 503, frozen[2]
            assert frozen[2].body["checks"]["database"]["ok"] is False
            await until_status(s, "GET", f"{base}{API}/channels", 200, 15, headers=auth)

            await asyncio.to_thread(pg.stop)
            stopped = await _requests(s, base, auth, channel)
            print("stopped:", ", ".join(f"{a.status} {a.seconds:.2f}s" for a in stopped))
            _assert_unavailable(*stopped[:2])
            assert stopped[2].seconds < BOUND_S and stopped[2].status == 503, stopped[2]

            await asyncio.to_thread(pg.start)
            await until_status(s, "GET", f"{base}{API}/channels", 200, 15, headers=auth)
            post = await timed(
                s, "POST", f"{base}{API}/channels/{channel}/messages", json={"body": "y"},
                headers=auth,
            )  # fmt: skip
            assert post.status == 201, post
            await until_status(s, "GET", f"{base}/health", 200, 15)
        log = server.text()
        assert "Traceback" not in log, log
        assert "internal_error" not in log
