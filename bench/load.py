"""Load: SSE connections up to the global limit (and past it), and the channel listing
under 50 concurrent readers at 1,000 channels — against a real ``herald serve``.

1. **Streams to the limit**: a server with ``HERALD_SSE_MAX_CONNECTIONS=N`` (default
   1,000) and ``HERALD_SSE_MAX_PER_IP=5``; clients spread over 127.0.1.1… (five streams
   per address) open N streams, then 5 % more: every stream up to N must open (200 and
   ``ready``), every one past it must get 429 ``server_busy`` with ``Retry-After``.
   Prints open time p50/p99, the server's RSS per stream, and `/health` while full.
   ``--streams 10000`` raises the limit to that many (the file-descriptor ceiling here
   is 20,000 per process: client and server each hold one per stream).
2. **Listing**: 1,000 channels (with members, 50 messages each, read markers) seeded
   like bench/queries.py; 50 readers each loop ``GET /api/v1/channels?limit=1000`` for
   ``--seconds``. Prints requests/s, latency p50/p99/max and any non-200.

Exit 1 if a stream under the limit failed, one past it was not refused with 429, or a
listing answer was not 200. The other three load runs of ``make load`` are
bench/queue.py (10,000 delayed messages), bench/attachments.py (100 concurrent
attachment operations) and bench/soak.py.

Run: ``.venv/bin/python -m bench.load`` (about a minute). Environment:
``HERALD_BENCH_PG`` (admin DSN; default postgresql://postgres@127.0.0.1:5432/postgres);
Redis is an own ``redis-server`` on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.queries import SEED_SQL
from shared.db.migrate import migrate
from shared.db.pool import Database, create_pool
from tests.faults.delivery_procs import Cluster, Herald, cluster
from tests.helpers import API
from tests.scratchdb import admin_exec

ADMIN_DSN = os.environ.get("HERALD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_NAME = f"herald_load_{os.getpid()}"
PER_IP = 5


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def rss_mb(proc: Herald) -> float:
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def open_stream(
    url: str, token: str, ip: str, opened: list[float], held: list[Any]
) -> tuple[int, str]:
    """Open one stream from ``ip``; (status, error code or '') and keep it open."""
    connector = aiohttp.TCPConnector(local_addr=(ip, 0), limit=0)
    session = aiohttp.ClientSession(connector=connector)
    started = time.perf_counter()
    try:
        resp = await session.get(
            url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None),
        )
    except (aiohttp.ClientError, OSError) as exc:
        await session.close()
        return 0, type(exc).__name__
    if resp.status != 200:
        body = await resp.json(content_type=None)
        retry = resp.headers.get("Retry-After", "")
        await session.close()
        code = body.get("error", {}).get("code", "") if isinstance(body, dict) else ""
        return resp.status, f"{code} retry-after={retry}"
    async for line in resp.content:
        if line.startswith(b"event: ready"):
            break
    opened.append((time.perf_counter() - started) * 1000)
    held.append((session, resp))
    return 200, ""


async def streams_to_the_limit(procs: Cluster, token: str, channel: int, limit: int) -> bool:
    per_ip = PER_IP if limit <= 1000 else max(PER_IP, -(-limit // 200))
    server = await procs.serve(
        HERALD_SSE_MAX_CONNECTIONS=str(limit),
        HERALD_SSE_MAX_PER_IP=str(per_ip),
        HERALD_SSE_HEARTBEAT_S="15",
    )
    base_rss = rss_mb(server)
    url = f"{server.url}{API}/channels/{channel}/events"
    extra = max(1, limit // 20)
    addresses = [
        f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(-(-(limit + extra) // per_ip))
    ]
    opened: list[float] = []
    held: list[Any] = []
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> tuple[int, str]:
        async with sem:
            return await open_stream(url, token, addresses[i // per_ip], opened, held)

    started = time.perf_counter()
    under = await asyncio.gather(*(one(i) for i in range(limit)))
    took = time.perf_counter() - started
    over = await asyncio.gather(*(one(limit + i) for i in range(extra)))
    full_rss = rss_mb(server)
    async with aiohttp.ClientSession() as s, s.get(f"{server.url}/health") as resp:
        health = (await resp.json())["sse"]
    ok_under = sum(1 for status, _ in under if status == 200)
    refused = [code for status, code in over if status == 429]
    print(f"\n== streams to the limit: HERALD_SSE_MAX_CONNECTIONS={limit}, per IP {per_ip}")
    print(f"opened {ok_under}/{limit} in {took:.1f} s; open time p50 {pct(opened, 50):.1f} ms,"
          f" p99 {pct(opened, 99):.1f} ms")  # fmt: skip
    print(f"past the limit: {len(refused)}/{extra} refused 429 ({sorted(set(refused))[:3]})")
    per_stream = (full_rss - base_rss) * 1024 / max(1, ok_under)
    print(f"server RSS {base_rss:.0f} MB idle, {full_rss:.0f} MB full: {per_stream:.1f} KB/stream")
    print(f"/health sse: active {health['active']}, rejected_global_total"
          f" {health['rejected_global_total']}")  # fmt: skip
    failures = [code for status, code in under if status != 200]
    if failures:
        print(f"FAILED under the limit: {len(failures)} ({sorted(set(failures))[:5]})")
    for session, resp in held:
        resp.close()
        await session.close()
    await server.stop()
    all_refused = len(refused) == extra and all(c.startswith("server_busy") for c in refused)
    return ok_under == limit and all_refused


async def listing(procs: Cluster, token: str, readers: int, seconds: float) -> bool:
    server = await procs.serve()
    url = f"{server.url}{API}/channels?limit=1000"
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    bad: dict[int, int] = {}
    items = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(url, headers=headers) as resp:  # warm-up
            items = len((await resp.json())["items"])
        deadline = time.perf_counter() + seconds

        async def reader() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        bad[resp.status] = bad.get(resp.status, 0) + 1
                latencies.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(reader() for _ in range(readers)))
        took = time.perf_counter() - started
    print(f"\n== channel listing: {readers} concurrent readers, {items} channels per answer")
    print(f"{len(latencies)} requests in {took:.1f} s: {len(latencies) / took:.0f}/s;"
          f" p50 {statistics.median(latencies):.0f} ms, p99 {pct(latencies, 99):.0f} ms,"
          f" max {max(latencies):.0f} ms; not 200: {bad or 'none'}")  # fmt: skip
    await server.stop()
    return not bad


async def main_async(args: argparse.Namespace) -> int:
    admin_exec(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    admin_exec(ADMIN_DSN, f'CREATE DATABASE "{DB_NAME}"')
    dsn = ADMIN_DSN.rpartition("/")[0] + f"/{DB_NAME}"
    ok = True
    try:
        db = Database(await create_pool(dsn, maxsize=2))
        try:
            await migrate(db)
            token = "load-token"
            me = await db.fetchval(
                "WITH u AS (INSERT INTO users (name) VALUES ('load-me') RETURNING id),"
                " t AS (INSERT INTO api_tokens (user_id, token_hash)"
                " SELECT id, sha256(%s::bytea) FROM u)"
                " SELECT id FROM u",
                (token.encode(),),
            )
            await db.execute(SEED_SQL, {"users": 500, "channels": 1000, "messages": 50, "me": me})
            channel = await db.fetchval(
                "SELECT channel_id FROM channel_members WHERE user_id = %s LIMIT 1", (me,)
            )
        finally:
            await db.close()
        with tempfile.TemporaryDirectory(prefix="herald-load-") as tmp:
            async with cluster(dsn, Path(tmp)) as procs:
                for limit in args.streams:
                    ok = await streams_to_the_limit(procs, token, channel, limit) and ok
                ok = await listing(procs, token, args.readers, args.seconds) and ok
    finally:
        admin_exec(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    print("\nload: " + ("every check held" if ok else "FAILED (see above)"))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--streams", type=int, nargs="+", default=[1000], help="global limits to fill"
    )
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
