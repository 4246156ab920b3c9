"""Attachment benchmark: upload+delete pairs over HTTP, and the orphan scan at scale.

1. Starts the real server (``python -m server``) on a throw-away database and upload
   directory and runs rounds of 100 concurrent upload+delete pairs (each pair: a
   multipart upload, then a DELETE of what it created). Prints throughput (pairs/s) and
   p50/p99 latency of the pairs and of each half.
2. Fills an upload directory with 100,000 files (sharded like real keys), 99,000 of
   them with rows and 1,000 without, and runs the orphan scan in a fresh child process
   (grace 0 so every file is eligible). Prints the scan time, what it found and removed,
   and the child's peak RSS (``ru_maxrss``) before and after the scan.

Run: ``.venv/bin/python bench/attachments.py`` (about a minute). Options: ``--pairs``,
``--rounds``, ``--size``, ``--files``, ``--orphans``, ``--port``. Environment:
``HERALD_BENCH_PG`` (admin DSN; default postgresql://postgres@127.0.0.1:5432/postgres) and
``HERALD_BENCH_REDIS`` (default redis://127.0.0.1:6379/13 — flushed at start).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where a sibling module could
# shadow the standard library (bench/queue.py shadows `queue`); use the repo root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from shared.db.migrate import migrate  # noqa: E402
from shared.db.pool import Database, create_pool  # noqa: E402
from shared.metrics import Metrics  # noqa: E402
from shared.services.attachments.storage import new_key  # noqa: E402
from shared.services.audit import AuditTrail  # noqa: E402
from shared.services.users import UserService  # noqa: E402
from shared.services.wiring import attachment_files  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.scratchdb import admin_exec  # noqa: E402

ADMIN_DSN = os.environ.get("HERALD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HERALD_BENCH_REDIS", "redis://127.0.0.1:6379/13")
DB_NAME = f"herald_bench_att_{os.getpid()}"


admin = partial(admin_exec, ADMIN_DSN)


def dsn(name: str) -> str:
    return ADMIN_DSN.rpartition("/")[0] + "/" + name


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


# -- part 1: upload+delete pairs over HTTP --------------------------------------------


async def wait_healthy(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit("server exited during start-up")
            try:
                async with s.get(base + "/health") as r:
                    if r.status in (200, 503):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("server did not answer /health in 30 s")


async def pairs_bench(args: argparse.Namespace, url: str, upload_dir: Path) -> None:
    db = Database(await create_pool(url, maxsize=2))
    try:
        _, token = await UserService(db=db).create("bench")
    finally:
        await db.close()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HERALD_")},
        "DATABASE_URL": url,
        "REDIS_URL": REDIS_URL,
        "HERALD_PORT": str(args.port),
        "HERALD_UPLOAD_DIR": str(upload_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"],
        env=env,
        cwd=upload_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{args.port}"
    headers = {"Authorization": f"Bearer {token}"}
    payload = os.urandom(args.size)
    try:
        await wait_healthy(base, proc)
        conn = aiohttp.TCPConnector(limit=args.pairs)
        async with aiohttp.ClientSession(connector=conn, headers=headers) as s:
            async with s.post(f"{base}/api/v1/channels", json={"name": "bench"}) as r:
                channel = (await r.json())["id"]

            async def pair() -> tuple[float, float, float]:
                t0 = time.perf_counter()
                form = aiohttp.FormData()
                form.add_field("file", payload, filename="bench.bin")
                async with s.post(f"{base}/api/v1/channels/{channel}/attachments", data=form) as r:
                    assert r.status == 201, await r.text()
                    att = await r.json()
                t1 = time.perf_counter()
                async with s.delete(f"{base}/api/v1/attachments/{att['id']}") as r:
                    assert r.status == 204, await r.text()
                t2 = time.perf_counter()
                return t2 - t0, t1 - t0, t2 - t1

            await asyncio.gather(*(pair() for _ in range(10)))  # warm-up
            server_cpu = psutil.Process(proc.pid)
            cpu_before = sum(server_cpu.cpu_times()[:2])
            results: list[tuple[float, float, float]] = []
            walls = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                results += await asyncio.gather(*(pair() for _ in range(args.pairs)))
                walls.append(time.perf_counter() - start)
            cpu_used = sum(server_cpu.cpu_times()[:2]) - cpu_before
        total = args.pairs * args.rounds
        pair_t = [r[0] for r in results]
        up_t = [r[1] for r in results]
        del_t = [r[2] for r in results]
        print(
            f"upload+delete pairs: {args.rounds} rounds x {args.pairs} concurrent,"
            f" {args.size} B files"
        )
        print(
            f"  throughput  {total / sum(walls):.0f} pairs/s  (rounds: "
            + ", ".join(f"{args.pairs / w:.0f}" for w in walls)
            + ")"
        )
        print(f"  pair        p50 {ms(statistics.median(pair_t))}  p99 {ms(pct(pair_t, 99))}")
        print(f"  upload      p50 {ms(statistics.median(up_t))}  p99 {ms(pct(up_t, 99))}")
        print(f"  delete      p50 {ms(statistics.median(del_t))}  p99 {ms(pct(del_t, 99))}")
        print(
            f"  server CPU  {cpu_used / total * 1000:.1f} ms per pair"
            f" ({cpu_used / sum(walls) * 100:.0f}% of one core; {os.cpu_count()} cores here)"
        )
        left = [p for p in upload_dir.rglob("*") if p.is_file()]
        print(f"  files left on disk after the run: {len(left)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- part 2: the orphan scan over many files ------------------------------------------


async def fill_tree(url: str, root: Path, files: int, orphans: int) -> None:
    db = Database(await create_pool(url, maxsize=2))
    try:
        user, _ = await UserService(db=db).create("scan-owner")
        channel = await db.fetchval(
            "INSERT INTO channels (name, created_by) VALUES ('scan', %s) RETURNING id", (user.id,)
        )
        batch: list[str] = []
        for i in range(files):
            key = new_key()
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"%016d" % i)
            if i >= orphans:
                batch.append(key)
            if len(batch) >= 5000 or (i == files - 1 and batch):
                await db.execute(
                    "INSERT INTO attachments (channel_id, uploader_id, storage_key, filename,"
                    " content_type, size, sha256, created_at)"
                    " SELECT %s, %s, k, 'f', 'application/octet-stream', 16, 'x',"
                    "   now() - interval '1 day' FROM unnest(%s::text[]) k",
                    (channel, user.id, batch),
                )
                batch = []
        await db.execute("ANALYZE attachments")
    finally:
        await db.close()


def scan_child(url: str, root: str) -> None:
    """Runs in a fresh process so its peak RSS is the scan's own."""

    async def run() -> dict[str, Any]:
        settings = replace(
            Settings.from_env(env={}, dotenv=None),
            database_url=url,
            upload_dir=Path(root),
            orphan_grace_s=0,
        )
        db = Database(await create_pool(url, maxsize=3))
        try:
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            files = attachment_files(
                db=db, settings=settings, metrics=Metrics(), audit=AuditTrail(db=db)
            )
            summary = await files.orphans.scan()
            elapsed = time.perf_counter() - start
        finally:
            await db.close()
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "summary": summary,
            "seconds": elapsed,
            "rss_before_kb": rss_before,
            "rss_peak_kb": rss_after,
        }

    print(json.dumps(asyncio.run(run())))


async def scan_bench(args: argparse.Namespace, url: str, root: Path) -> None:
    t0 = time.perf_counter()
    await fill_tree(url, root, args.files, args.orphans)
    print(
        f"orphan scan: {args.files} files, {args.orphans} without a row"
        f" (tree built in {time.perf_counter() - t0:.1f} s)"
    )
    out = subprocess.run(
        [sys.executable, __file__, "--scan-child", url, str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    s = result["summary"]
    print(
        f"  scan time   {result['seconds']:.2f} s  ({s['scanned'] / result['seconds']:.0f} files/s)"
    )
    print(
        f"  found       scanned {s['scanned']}, orphans {s['orphans']}, deleted {s['deleted']},"
        f" bytes freed {s['bytes_freed']}, dangling rows {s['dangling_rows']}"
    )
    print(
        f"  peak RSS    {result['rss_peak_kb'] / 1024:.1f} MiB"
        f" (process before the scan: {result['rss_before_kb'] / 1024:.1f} MiB)"
    )


async def main(args: argparse.Namespace) -> None:
    admin(f'DROP DATABASE IF EXISTS "{DB_NAME}"')
    admin(f'CREATE DATABASE "{DB_NAME}"')
    url = dsn(DB_NAME)
    work = Path(tempfile.mkdtemp(prefix="herald-bench-att-"))
    try:
        r = aioredis.Redis.from_url(REDIS_URL)
        await r.flushdb()
        await r.aclose()
        db = Database(await create_pool(url, maxsize=1))
        try:
            await migrate(db)
        finally:
            await db.close()
        await pairs_bench(args, url, work / "uploads")
        admin(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        admin(f'CREATE DATABASE "{DB_NAME}"')
        db = Database(await create_pool(url, maxsize=1))
        try:
            await migrate(db)
        finally:
            await db.close()
        await scan_bench(args, url, work / "scan")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        admin(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--scan-child":
        scan_child(sys.argv[2], sys.argv[3])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--orphans", type=int, default=1_000)
    parser.add_argument("--port", type=int, default=23080)
    asyncio.run(main(parser.parse_args()))
