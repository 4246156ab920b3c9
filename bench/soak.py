"""Soak: 2 servers + 2 workers under mixed traffic, with a Redis restart and a PostgreSQL
restart in the middle; every stream must end with exactly what PostgreSQL committed.

Everything runs on its own: a throwaway PostgreSQL cluster (``initdb``/``pg_ctl`` as the
``postgres`` user, ``fsync=off``), an own ``redis-server``, two ``herald serve`` and two
``herald worker`` processes. Traffic for ``--minutes``: posts at ``--rate`` per second
through both servers, a delayed message a second (due 2 s later, delivered by the
workers), an attachment upload + download + delete every 2 s, a channel listing every
0.5 s; 12 streams stay open throughout (per-channel and multi-channel, on both servers).
At a third of the run Redis is stopped for 3 s and comes back empty; at two thirds
PostgreSQL restarts (``pg_ctl restart -m fast``).

Printed: RSS and open descriptors of each process at start, middle and end; answers by
status; the longest answer; per stream, messages received against committed. Exit 0 only
if every stream got every committed message of its channels once, in order, no answer
was a 5xx other than 503 ``service_unavailable`` (the contract's answer while PostgreSQL
is away), and every process is still running.

Run: ``.venv/bin/python -m bench.soak`` (15 minutes; ``--minutes 2`` for a short run).
``make load`` runs it after the load benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from shared.db.pool import Database, create_pool
from tests.faults.delivery_procs import (
    Cluster,
    Herald,
    RedisServer,
    Watch,
    committed,
    free_port,
)
from tests.helpers import API, wait_for

PG_BIN = (
    Path("/usr/lib/postgresql")
    / (
        sorted(os.listdir("/usr/lib/postgresql"))[-1]
        if Path("/usr/lib/postgresql").is_dir()
        else ""
    )
    / "bin"
)
CHANNELS = 6
CATCHUP_S = 2.0


class PgCluster:
    """A throwaway PostgreSQL cluster (initdb refuses root: run as ``postgres``)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "pgdata"
        self.port = free_port(20000, 22000)
        self.log = workdir / "postgres.log"
        self.workdir = workdir

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], capture_output=True, timeout=60
        )

    def start(self) -> None:
        shutil.chown(self.workdir, "postgres")
        done = self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.dir), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(done.stderr.decode())
        self._ctl("start")

    def _ctl(self, *what: str) -> None:
        options = (
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=200"
        )
        done = self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-l", str(self.log), "-o", options,
            "-w", "-m", "fast", *what,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(done.stdout.decode() + done.stderr.decode())

    def restart(self) -> None:
        self._ctl("restart")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._ctl("stop")

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # 5xx other than 503 service_unavailable
    longest_s: float = 0.0

    async def call(self, kind: str, session: aiohttp.ClientSession, method: str, url: str,
                   **kw: Any) -> tuple[int, Any]:  # fmt: skip
        started = time.monotonic()
        status, body = 0, None
        try:
            async with session.request(
                method, url, timeout=aiohttp.ClientTimeout(total=30), **kw
            ) as resp:
                status = resp.status
                body = await resp.read()
                key = f"{kind} {status}"
                if status >= 500:
                    text = body.decode(errors="replace")
                    if not (status == 503 and "service_unavailable" in text):
                        self.bad.append(f"{kind} {status} {text[:200]}")
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            key = f"{kind} {type(exc).__name__}"
        self.statuses[key] += 1
        self.longest_s = max(self.longest_s, time.monotonic() - started)
        return status, body


def usage(proc: Herald) -> tuple[float, int]:
    """(RSS in MB, open descriptors) of a running process, from /proc."""
    pid = proc.proc.pid
    try:
        rss_kb = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return 0.0, 0
    return rss_kb / 1024, fds


def herald_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "herald", *args], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"herald {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


async def traffic(
    stop: asyncio.Event,
    session: aiohttp.ClientSession,
    servers: list[str],
    tokens: list[str],
    channels: list[int],
    tally: Tally,
    rate: float,
) -> None:
    rng = random.Random(7)

    def pick() -> tuple[str, dict[str, str]]:
        return rng.choice(servers), {"Authorization": f"Bearer {rng.choice(tokens)}"}

    in_flight: set[asyncio.Future[Any]] = set()

    async def posts() -> None:
        n = 0
        while not stop.is_set():
            base, auth = pick()
            n += 1
            url = f"{base}{API}/channels/{rng.choice(channels)}/messages"
            task = asyncio.ensure_future(tally.call(
                "post", session, "POST", url, json={"body": f"soak {n}"}, headers=auth,
            ))  # fmt: skip
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            await asyncio.sleep(1 / rate)
        if in_flight:
            await asyncio.wait(in_flight)

    async def every(seconds: float, kind: str, make: Any) -> None:
        while not stop.is_set():
            base, auth = pick()
            await make(base, auth)
            await asyncio.sleep(seconds)

    async def delayed(base: str, auth: dict[str, str]) -> None:
        url = f"{base}{API}/channels/{rng.choice(channels)}/delayed-messages"
        await tally.call(
            "delayed", session, "POST", url,
            json={"body": "later", "delay_seconds": 2}, headers=auth,
        )  # fmt: skip

    async def attachment(base: str, auth: dict[str, str]) -> None:
        form = aiohttp.FormData()
        form.add_field("file", os.urandom(20_000), filename="soak.bin")
        status, body = await tally.call(
            "upload", session, "POST", f"{base}{API}/channels/{channels[0]}/attachments",
            data=form, headers=auth,
        )  # fmt: skip
        if status == 201:
            import json

            att = json.loads(body)["id"]
            await tally.call(
                "download", session, "GET", f"{base}{API}/attachments/{att}/content", headers=auth
            )
            await tally.call(
                "delete", session, "DELETE", f"{base}{API}/attachments/{att}", headers=auth
            )

    async def listing(base: str, auth: dict[str, str]) -> None:
        await tally.call("list", session, "GET", f"{base}{API}/channels?limit=100", headers=auth)

    await asyncio.gather(
        posts(),
        every(1.0, "delayed", delayed),
        every(2.0, "upload", attachment),
        every(0.5, "list", listing),
    )


async def keep_open(watch: Watch, stop: asyncio.Event) -> None:
    """Reopen a stream that ended (with its last id, as a browser would)."""
    while not stop.is_set():
        await watch.ended.wait()
        if stop.is_set():
            return
        with contextlib.suppress(Exception):
            await watch.open(resume=True)
        if watch.ended.is_set():
            await asyncio.sleep(0.5)


async def soak(minutes: float, rate: float) -> int:
    work = Path(tempfile.mkdtemp(prefix="herald-soak-"))
    os.chmod(work, 0o755)  # noqa: S103 - the postgres user must reach its data folder
    pg = PgCluster(work)
    redis = RedisServer(work / "redis")
    print(f"soak: {minutes:g} min, {rate:g} posts/s, workdir {work}")
    pg.start()
    await redis.start()
    procs = Cluster(pg.dsn("herald"), redis, work / "run")
    subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "createdb"), "-h",
                    "127.0.0.1", "-p", str(pg.port), "herald"], check=True)  # fmt: skip
    env = procs.env(HERALD_BACKEND_TIMEOUT_S="2", HERALD_SSE_CATCHUP_S=str(CATCHUP_S),
                    HERALD_ORPHAN_GRACE_S="60")  # fmt: skip
    herald_cli(env, "migrate")
    tokens = []
    for i in range(4):
        out = herald_cli(env, "users", "create", f"soak{i}", *(["--admin"] if i == 0 else []))
        tokens.append(out.split("token: ")[1].split()[0])
    extra = {"HERALD_BACKEND_TIMEOUT_S": "2", "HERALD_SSE_CATCHUP_S": str(CATCHUP_S)}
    servers = [await procs.serve(**extra) for _ in range(2)]
    workers = [await procs.worker(**extra) for _ in range(2)]
    everyone = servers + workers
    names = ["server1", "server2", "worker1", "worker2"]
    db = Database(await create_pool(pg.dsn("herald"), maxsize=2))
    stop = asyncio.Event()
    tally = Tally()
    samples: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    code = 1
    try:
        async with aiohttp.ClientSession() as session:
            admin = {"Authorization": f"Bearer {tokens[0]}"}
            channels = []
            for c in range(CHANNELS):
                async with session.post(
                    f"{servers[0].url}{API}/channels", json={"name": f"soak-{c}"}, headers=admin
                ) as resp:
                    channels.append((await resp.json())["id"])
                for user in range(1, 4):
                    async with session.post(
                        f"{servers[0].url}{API}/channels/{channels[-1]}/members",
                        json={"user_id": user + 1}, headers=admin,
                    ) as resp:  # fmt: skip
                        assert resp.status in (204, 409), await resp.text()
            watches: list[tuple[Watch, list[int]]] = []
            for s, server in enumerate(servers):
                for c in channels[:4]:
                    url = f"{server.url}{API}/channels/{c}/events"
                    watches.append((Watch(session, url, tokens[1 + s], f"s{s + 1}-ch{c}"), [c]))
                for t in (1, 2):
                    url = f"{server.url}{API}/events"
                    watches.append((Watch(session, url, tokens[t], f"s{s + 1}-all-u{t}"), channels))
            for watch, _ in watches:
                await watch.open()
            keepers = [asyncio.create_task(keep_open(w, stop)) for w, _ in watches]

            def sample() -> None:
                for name, proc in zip(names, everyone, strict=True):
                    samples[name].append(usage(proc))

            sample()
            run = asyncio.create_task(
                traffic(stop, session, [s.url for s in servers], tokens, channels, tally, rate)
            )
            total = minutes * 60
            started = time.monotonic()

            async def until(fraction: float) -> None:
                await asyncio.sleep(max(0.0, started + total * fraction - time.monotonic()))

            await until(1 / 3)
            print(f"{time.monotonic() - started:6.1f} s  Redis stopped (3 s, comes back empty)")
            await redis.stop()
            await asyncio.sleep(3)
            await redis.start()
            await until(1 / 2)
            sample()
            await until(2 / 3)
            print(f"{time.monotonic() - started:6.1f} s  PostgreSQL restart (pg_ctl -m fast)")
            await asyncio.to_thread(pg.restart)
            await until(1.0)
            stop.set()
            await run
            # Answers in flight and due delayed messages land; then the streams catch up.
            await asyncio.sleep(3)
            sample()
            truth = await committed(db, channels)
            overdue = await db.fetchval(
                "SELECT count(*) FROM delayed_messages"
                " WHERE status = 'pending' AND deliver_at < now() - interval '5 seconds'"
            )

            def caught_up() -> bool:
                have = {(g.channel_id, g.id) for w, _ in watches for g in w.got}
                return all((c, m) in have for c in channels for m in truth[c])

            with contextlib.suppress(AssertionError):
                await wait_for(caught_up, CATCHUP_S + 10, "every stream")
            for k in keepers:
                k.cancel()
            for watch, _ in watches:
                await watch.drop()

            print("\nprocess   RSS MB start/middle/end   fds start/middle/end")
            for name in names:
                rss = "/".join(f"{m:.0f}" for m, _ in samples[name])
                fds = "/".join(str(f) for _, f in samples[name])
                print(f"{name:<9} {rss:<26} {fds}")
            print("\nanswers:", ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items())))
            print(f"longest answer: {tally.longest_s:.2f} s")
            print(f"messages committed: {sum(len(v) for v in truth.values())}")
            exact = True
            for watch, followed in watches:
                problems = []
                for c in followed:
                    got = watch.of(c)
                    if got != truth[c]:
                        distinct, want = len(set(got)), len(truth[c])
                        problems.append(
                            f"ch{c}: {len(got)} got, {distinct} distinct, {want} committed"
                        )
                if watch.resets():
                    problems.append(f"resets {watch.resets()}")
                exact = exact and not problems
                state = "exact" if not problems else "; ".join(problems)
                got_n = len(watch.got)
                print(f"stream {watch.name:<12} opens {watch.opens}  {got_n} messages  {state}")
            alive = all(p.proc.poll() is None for p in everyone)
            print(f"\n5xx other than 503 service_unavailable: {len(tally.bad)}")
            for line in tally.bad[:10]:
                print("   ", line)
            print(f"delayed messages overdue and not delivered: {overdue}")
            print(f"every process still running: {alive}")
            print(f"every stream exact: {exact}")
            code = 0 if exact and alive and not tally.bad and not overdue else 1
    finally:
        stop.set()
        await db.close()
        await procs.close()
        await redis.close()
        await asyncio.to_thread(pg.stop)
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=20.0, help="posts per second")
    args = parser.parse_args()
    return asyncio.run(soak(args.minutes, args.rate))


if __name__ == "__main__":
    sys.exit(main())
