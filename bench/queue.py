"""Delayed-message queue benchmark: HTTP enqueue rate, a 10,000-message burst due at the
same second, and cleanup of 100,000 old rows.

Starts the real server (``python -m server``) and worker (``python -m worker``) on a
throw-away database, then:

1. **Enqueue**: N delayed messages (default 10,000 = HERALD_QUEUE_MAX) over HTTP from
   many users (the per-user cap is 500), C requests in flight. Prints messages/s and
   request latency p50/p99.
2. **Burst delivery**: every one of those messages is made due at the same second T (one
   UPDATE of ``deliver_at``, and T's delivery job queued as the server would: the messages
   were scheduled an hour ahead so the enqueue phase could not race their delivery).
   A Redis subscriber on the event bus timestamps each published message. Prints the
   time from T until all are delivered, and lateness (publish seen - T) p50/p99/max,
   plus the commit-side lateness (``finished_at - deliver_at``).
3. **Normal load**: S messages (default 200) due one after another at 20/s, each
   scheduled ~2 s ahead over HTTP; lateness (publish seen - its deliver_at) p50/p99/max:
   the issue's "within 1 s (p99) at normal load".
4. **Cleanup**: R (default 100,000) finished rows older than the retention are inserted
   and the worker's cleanup job is run (``herald jobs`` path: JobService + the worker).
   Prints rows/s, batches and the longest batch transaction (the longest any row lock
   was held), from the run's own record.

Run: ``.venv/bin/python bench/queue.py`` (one to two minutes). Options: ``--messages``,
``--concurrency``, ``--steady``, ``--rate``, ``--cleanup-rows``, ``--port``.
Environment: ``HERALD_BENCH_PG`` (admin DSN; default
postgresql://postgres@127.0.0.1:5432/postgres) and ``HERALD_BENCH_REDIS`` (default
redis://127.0.0.1:6379/12 — flushed at start and end).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named queue.py, and running it puts its folder first on sys.path, where
# it would shadow the standard library's `queue` (which redis imports): drop the folder.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from shared.bus import arq_pool  # noqa: E402
from shared.constants import JOB_DELIVER_DELAYED, QUEUE_NAME, events_channel  # noqa: E402
from shared.db.migrate import migrate  # noqa: E402
from shared.db.pool import Database, create_pool  # noqa: E402
from shared.services.delayed.scheduling import delivery_tick  # noqa: E402
from shared.services.jobs import JobService  # noqa: E402
from shared.services.users import UserService  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.scratchdb import admin_exec  # noqa: E402

ADMIN_DSN = os.environ.get("HERALD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HERALD_BENCH_REDIS", "redis://127.0.0.1:6379/12")
PER_USER = 400


admin = partial(admin_exec, ADMIN_DSN)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Processes:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, module: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{module}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=self.env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def wait_http(base: str, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{base}/health") as resp:
                    if resp.status in (200, 503):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not start")


async def enqueue_phase(
    base: str, tokens: list[str], channel: int, n: int, concurrency: int
) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures: dict[int, int] = {}
    deliver_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    url = f"{base}/api/v1/channels/{channel}/delayed-messages"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            headers = {"Authorization": f"Bearer {tokens[i // PER_USER]}"}
            async with sem:
                start = time.perf_counter()
                async with session.post(
                    url, json={"body": f"burst {i}", "deliver_at": deliver_at}, headers=headers
                ) as resp:
                    await resp.read()
                    latencies.append(time.perf_counter() - start)
                    if resp.status != 202:
                        failures[resp.status] = failures.get(resp.status, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"enqueue failures by status: {failures}")
    return elapsed, latencies


async def burst_phase(db: Database, settings: Settings, n: int) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(settings.redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(events_channel(settings.redis_db))
    seen: list[float] = []

    async def listen() -> None:
        while len(seen) < n:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and json.loads(msg["data"]).get("type") == "message":
                seen.append(time.time())

    listener = asyncio.create_task(listen())
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    await db.execute("UPDATE delayed_messages SET deliver_at = %s WHERE status = 'pending'", (due,))
    arq = await arq_pool(settings)
    job_id, run_at = delivery_tick(due)
    await arq.enqueue_job(
        JOB_DELIVER_DELAYED, _job_id=job_id, _defer_until=run_at, _queue_name=QUEUE_NAME
    )
    await arq.aclose()
    try:
        await asyncio.wait_for(listener, 120)
    finally:
        await pubsub.aclose()
        await redis.aclose()
    t = due.timestamp()
    lateness = [s - t for s in seen]
    commit = await db.fetch(
        "SELECT extract(epoch FROM finished_at - deliver_at)::float8 AS late"
        " FROM delayed_messages WHERE status = 'delivered'"
    )
    commit_late = [r["late"] for r in commit]
    return {
        "delivered": len(commit_late),
        "all_delivered_after_s": max(lateness),
        "late_p50": pct(lateness, 50),
        "late_p99": pct(lateness, 99),
        "late_max": max(lateness),
        "commit_p50": pct(commit_late, 50),
        "commit_p99": pct(commit_late, 99),
    }


async def steady_phase(
    base: str, tokens: list[str], channel: int, settings: Settings, n: int, rate: float
) -> dict[str, Any]:
    """Normal load: ``n`` messages due one after another, ``rate`` per second, each
    scheduled a couple of seconds ahead; lateness = publish seen - its own deliver_at."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(events_channel(settings.redis_db))
    start = datetime.now(UTC) + timedelta(seconds=2)
    due = {f"steady {i}": (start + timedelta(seconds=i / rate)).timestamp() for i in range(n)}
    lateness: list[float] = []

    async def listen() -> None:
        while len(lateness) < n:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            event = json.loads(msg["data"])
            body = event.get("message", {}).get("body")
            if event.get("type") == "message" and body in due:
                lateness.append(time.time() - due[body])

    listener = asyncio.create_task(listen())
    url = f"{base}/api/v1/channels/{channel}/delayed-messages"
    async with aiohttp.ClientSession() as session:
        for i, (body, when) in enumerate(due.items()):
            # Schedule each ~2 s before it is due, as a steady stream of clients would.
            await asyncio.sleep(max(0.0, when - 2.0 - time.time()))
            headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            at = datetime.fromtimestamp(when, UTC).isoformat()
            async with session.post(
                url, json={"body": body, "deliver_at": at}, headers=headers
            ) as r:
                if r.status != 202:
                    raise RuntimeError(f"steady schedule failed: {r.status} {await r.text()}")
    try:
        await asyncio.wait_for(listener, 60)
    finally:
        await pubsub.aclose()
        await redis.aclose()
    return {"p50": pct(lateness, 50), "p99": pct(lateness, 99), "max": max(lateness)}


async def cleanup_phase(db: Database, settings: Settings, rows: int) -> dict[str, Any]:
    await db.execute(
        "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at, status, reason,"
        " finished_at) SELECT 1, 1, 'old ' || g, now() - interval '3 days', 'failed',"
        " 'too_late', now() - interval '2 days' - g * interval '1 millisecond'"
        " FROM generate_series(1, %s) g",
        (rows,),
    )
    await db.execute("ANALYZE delayed_messages")
    arq = await arq_pool(settings)
    try:
        jobs = JobService(arq=arq)
        job_id, _ = await jobs.enqueue("cleanup-delayed-messages")
        state = await jobs.wait(job_id, max_wait_s=300)
    finally:
        await arq.aclose()
    if not state.ok:
        raise RuntimeError(f"cleanup did not succeed: {state.as_dict()}")
    result: dict[str, Any] = state.result
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cleanup-rows", type=int, default=100_000)
    parser.add_argument("--steady", type=int, default=200, help="normal-load messages")
    parser.add_argument("--rate", type=float, default=20.0, help="normal-load messages/s")
    parser.add_argument("--port", type=int, default=22080)
    args = parser.parse_args()

    dbname = f"herald_bench_queue_{os.getpid()}"
    admin(f'DROP DATABASE IF EXISTS "{dbname}"')
    admin(f'CREATE DATABASE "{dbname}"')
    database_url = ADMIN_DSN.rpartition("/")[0] + f"/{dbname}"
    settings = Settings.from_env(
        env={"DATABASE_URL": database_url, "REDIS_URL": REDIS_URL}, dotenv=None
    )
    flush = aioredis.Redis.from_url(REDIS_URL)
    await flush.flushdb()
    db = Database(await create_pool(database_url, maxsize=4))
    workdir = Path(tempfile.mkdtemp(prefix="herald-bench-queue-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "CRON_"))}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=REDIS_URL,
        HERALD_PORT=str(args.port),
        HERALD_QUEUE_MAX=str(max(10_000, args.messages)),
        HERALD_QUEUE_ALERT=str(max(8_000, int(args.messages * 0.8))),
        PYTHONPATH=str(ROOT),
    )
    procs = Processes(env, workdir)
    try:
        await migrate(db)
        users = UserService(db=db)
        tokens = []
        for i in range((args.messages + PER_USER - 1) // PER_USER):
            user, token = await users.create(f"bench{i}")
            tokens.append(token)
        channel = await db.fetchval(
            "INSERT INTO channels (name, created_by) VALUES ('bench', %s) RETURNING id",
            (user.id,),
        )
        base = f"http://127.0.0.1:{args.port}"
        procs.start("server")
        procs.start("worker")
        await wait_http(base)

        print(
            f"== enqueue: {args.messages} delayed messages over HTTP, {args.concurrency} in flight"
        )
        elapsed, lat = await enqueue_phase(base, tokens, channel, args.messages, args.concurrency)
        print(f"   {args.messages / elapsed:,.0f} messages/s ({elapsed:.2f} s)")
        print(
            f"   request latency p50 {pct(lat, 50) * 1000:.1f} ms, p99 {pct(lat, 99) * 1000:.1f} ms"
        )

        print(f"== burst: all {args.messages} due at the same second")
        burst = await burst_phase(db, settings, args.messages)
        after = burst["all_delivered_after_s"]
        print(f"   delivered {burst['delivered']}; all delivered {after:.2f} s after T")
        print(
            f"   lateness (publish seen - T): p50 {burst['late_p50'] * 1000:.0f} ms,"
            f" p99 {burst['late_p99'] * 1000:.0f} ms, max {burst['late_max'] * 1000:.0f} ms"
        )
        print(
            f"   commit lateness (finished_at - deliver_at): p50 {burst['commit_p50'] * 1000:.0f}"
            f" ms, p99 {burst['commit_p99'] * 1000:.0f} ms"
        )

        print(f"== normal load: {args.steady} messages due one by one, {args.rate:g}/s")
        steady = await steady_phase(base, tokens, channel, settings, args.steady, args.rate)
        print(
            f"   lateness (publish seen - deliver_at): p50 {steady['p50'] * 1000:.0f} ms,"
            f" p99 {steady['p99'] * 1000:.0f} ms, max {steady['max'] * 1000:.0f} ms"
        )

        print(f"== cleanup: {args.cleanup_rows:,} old rows, batches of {settings.cleanup_batch}")
        run = await cleanup_phase(db, settings, args.cleanup_rows)
        seconds = run["duration_ms"] / 1000
        print(
            f"   deleted {run['deleted']:,} in {run['batches']} batches, {seconds:.2f} s:"
            f" {run['deleted'] / seconds:,.0f} rows/s"
        )
        print(f"   longest lock held (longest batch transaction): {run['max_batch_ms']:.1f} ms")
        left = await db.fetchval("SELECT count(*) FROM delayed_messages")
        print(f"   rows left (the burst's fresh delivered rows): {left:,}")
    finally:
        procs.stop()
        await db.close()
        await flush.flushdb()
        await flush.aclose()
        admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
