"""``herald worker`` under outages, as a real process on an own Redis and an own
PostgreSQL cluster: Redis stopped for ~1.5 s and started again empty, then PostgreSQL
stopped and started. The process stays up, its /health says "reconnecting" (Redis) or
"degraded" (PostgreSQL) meanwhile,
``herald worker --check`` is 0 again soon after Redis is back, the delayed messages due
during each outage are delivered exactly once after it, the log has one line per state
change, and SIGTERM exits 0 with no ResourceWarning and no connection left behind.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp

from shared.db.migrate import migrate
from shared.db.pool import Database, create_pool
from tests.faults.backend_procs import herald_cli, pg_cluster, timed, token_of
from tests.faults.delivery_procs import ROOT, cluster, free_port
from tests.helpers import API, wait_for

BACKEND_S = 1.0
OUTAGE_S = 1.5
# The worker's backoff is capped at 10 s, but a short outage is retried within ~4 s;
# the delivery sweep runs every 5 s. Slack for a shared 2-core machine on top.
CHECK_BACK_S = 15.0
DELIVERED_S = 30.0


def _check(env: dict[str, str]) -> int:
    return subprocess.run(
        [sys.executable, "-m", "herald", "worker", "--check"],
        env=env, cwd=ROOT, capture_output=True, timeout=30,
    ).returncode  # fmt: skip


async def _copies(db: Database, body: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM messages WHERE body = %s", (body,)))


async def test_worker_rides_out_redis_and_postgres_restarts(tmp_path):
    async with pg_cluster() as pg, cluster(pg.dsn(), tmp_path) as procs:
        url = pg.create_database("herald")
        db = Database(await create_pool(url, maxsize=1))
        try:
            await migrate(db)
            extra = {"DATABASE_URL": url, "HERALD_BACKEND_TIMEOUT_S": str(BACKEND_S)}
            env = procs.env(**extra)
            token = token_of(await asyncio.to_thread(herald_cli, env, "users", "create", "al"))
            server = await procs.serve(**extra)
            metrics_port = free_port(28000, 30000)
            worker = await procs.worker(
                **extra,
                HERALD_WORKER_METRICS_PORT=str(metrics_port),
                PYTHONWARNINGS="always::ResourceWarning",
            )
            await wait_for(lambda: _check(env) == 0, 30, "worker --check", interval=0.2)
            auth = {"Authorization": f"Bearer {token}"}
            health = f"http://127.0.0.1:{metrics_port}/health"
            async with aiohttp.ClientSession() as s:
                made = await timed(
                    s, "POST", f"{server.url}{API}/channels", json={"name": "c"}, headers=auth
                )
                channel = f"{server.url}{API}/channels/{made.body['id']}"

                async def delayed(body: str) -> None:
                    answer = await timed(
                        s, "POST", f"{channel}/delayed-messages",
                        json={"body": body, "delay_seconds": 1}, headers=auth,
                    )  # fmt: skip
                    assert answer.status == 202, answer

                # 1. Redis away (and back empty: the message's delivery job is gone too).
                await delayed("due while redis is away")
                await procs.redis.stop()

                async def reconnecting() -> bool:
                    answer = await timed(s, "GET", health)
                    return answer.status == 503 and answer.body["state"] == "reconnecting"

                await wait_for(reconnecting, 10, "worker /health: reconnecting", interval=0.1)
                await asyncio.sleep(OUTAGE_S)  # the outage's length, not a wait for anything
                assert worker.proc.poll() is None, worker.text()
                await procs.redis.start()
                back_at = time.monotonic()
                await wait_for(lambda: _check(env) == 0, CHECK_BACK_S, "--check after Redis")
                check_back_s = time.monotonic() - back_at
                await wait_for(
                    lambda: _copies(db, "due while redis is away"), DELIVERED_S, "delivery 1"
                )

                # 2. PostgreSQL restarted.
                await db.close()
                await delayed("due while postgres is away")
                await asyncio.to_thread(pg.stop)
                await asyncio.sleep(OUTAGE_S)  # the outage's length
                assert worker.proc.poll() is None, worker.text()
                await asyncio.to_thread(pg.start)
                db = Database(await create_pool(url, maxsize=1))
                pg_back = time.monotonic()

                async def healthy() -> bool:
                    return (await timed(s, "GET", health)).status == 200

                await wait_for(healthy, CHECK_BACK_S, "worker /health after PostgreSQL")
                health_back_s = time.monotonic() - pg_back
                await wait_for(
                    lambda: _copies(db, "due while postgres is away"), DELIVERED_S, "delivery 2"
                )
            print(
                f"worker: --check 0 again {check_back_s:.2f}s after Redis,"
                f" /health ok {health_back_s:.2f}s after PostgreSQL"
            )

            # One more sweep must not deliver either a second time.
            await server.stop()
            sweeps_later = time.monotonic() + 6
            await wait_for(lambda: time.monotonic() > sweeps_later, 10, "a sweep", interval=0.2)
            assert await _copies(db, "due while redis is away") == 1
            assert await _copies(db, "due while postgres is away") == 1
            statuses = await db.fetch("SELECT status FROM delayed_messages")
            assert [r["status"] for r in statuses] == ["delivered", "delivered"]

            # SIGTERM: exit 0, nothing leaked, no connection left on the database.
            await db.close()
            await wait_for(lambda: pg.connections("herald") <= 5, 10, "only the worker's left")
            assert await worker.stop() == 0, worker.text()
            await wait_for(lambda: pg.connections("herald") == 0, 10, "no connection left")
        finally:
            await db.close()
        log = worker.text()
        assert "ResourceWarning" not in log, log
        assert "Traceback" not in log, log
        # Redis lost stops arq's loop (one line, then one when back); PostgreSQL lost
        # only fails jobs, each in one line: arq's loop runs on.
        assert log.count("worker lost Redis or PostgreSQL") == 1, log
        assert log.count("worker reconnected") == 1, log
