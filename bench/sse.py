"""SSE benchmark: Herald's stream manager against the stock aiohttp-sse pattern.

    .venv/bin/python bench/sse.py             # full run (0/1000/5000/10000 streams), ~2-3 min
    .venv/bin/python bench/sse.py --quick     # 1000 streams only
    .venv/bin/python bench/sse.py --compare-gc  # Herald also without tune_gc()

Three processes: this driver; one server (``herald`` = server.runner.run, the same code
``herald serve`` runs, or ``stock`` = a queue and an aiohttp-sse ping task per
connection, no manager: bench/stock_sse.py); one client process holding every connection,
spread over 127.0.1.1-127.0.1.200. Figures are printed, never asserted.

Needs PostgreSQL and Redis (HERALD_BENCH_PG, default postgres@127.0.0.1:5432;
HERALD_BENCH_REDIS, default redis://127.0.0.1:6379/11). A throwaway database is
created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0]: a sibling named like a stdlib module (queue.py)
# would shadow it in every process this starts. Import from the project root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

ADMIN_PG = os.environ.get("HERALD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HERALD_BENCH_REDIS", "redis://127.0.0.1:6379/11")
ADDRESSES = [f"127.0.1.{i}" for i in range(1, 201)]
MARK = re.compile(rb"mk:(\d+):")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    for port in range(21000, 22000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 21000-21999")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def herald_server(gc_tune: bool) -> None:
    import logging

    import server.runner as runner
    from shared.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    if not gc_tune:
        runner.tune_gc = lambda: None
    # serve(): the event loop `herald serve` uses (uvloop unless HERALD_UVLOOP=0).
    runner.serve(Settings.from_env(dotenv=None))


# -- the client process ---------------------------------------------------------------------


class Conn(asyncio.Protocol):
    def __init__(self, client: Clients) -> None:
        self.client = client
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.seen: set[int] = set()
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.ready.done():
            if self.client.ready_marker in data:
                self.ready.set_result(None)
            elif data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.1 5"):
                self.ready.set_exception(RuntimeError(data[:12].decode()))
        if b"mk:" in data:
            for m in MARK.finditer(self.tail + data):
                seq = int(m.group(1))
                # A set, not the highest seen: concurrent posts can commit out of order.
                if seq not in self.seen:
                    self.seen.add(seq)
                    self.client.times.setdefault(seq, []).append(now)
        self.tail = data[-16:]

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("lost"))


class Clients:
    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.times: dict[int, list[float]] = {}
        self.opened = 0
        # What says a stream is subscribed: Herald's and the stock server's first event;
        # Nchan (bench/peers.py) subscribes before it sends its response head.
        self.ready_marker = b"event: ready"

    async def open_one(self, host: str, port: int, request: bytes, ip: str) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: Conn(self), host, port, local_addr=(ip, 0))
        assert conn.transport is not None
        conn.transport.write(request)
        await asyncio.wait_for(conn.ready, 30)
        return conn

    async def open(self, n: int, host: str, port: int, request: str) -> dict[str, Any]:
        raw = request.encode()
        gate = asyncio.Semaphore(200)
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            async with gate:
                try:
                    ip = ADDRESSES[(self.opened + i) % len(ADDRESSES)]
                    self.conns.append(await self.open_one(host, port, raw, ip))
                except Exception:
                    failed += 1

        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        self.opened += n
        return {"elapsed": time.monotonic() - start, "failed": failed, "open": len(self.conns)}

    async def wait(self, seqs: list[int], count: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while any(len(self.times.get(s, ())) < count for s in seqs):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)
        out = {}
        for s in seqs:
            ts = self.times.get(s, [])
            out[str(s)] = {
                "n": len(ts),
                "first": min(ts, default=0),
                "last": max(ts, default=0),
                "p50": pct(ts, 0.5) if ts else 0,
                "p99": pct(ts, 0.99) if ts else 0,
            }
        return out

    def close(self) -> dict[str, Any]:
        n = len(self.conns)
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()
        self.conns.clear()
        self.times.clear()
        return {"closed": n}


async def client_main() -> None:
    import gc

    # The client process is not under test: keep its collector out of the timings.
    gc.disable()
    clients = Clients()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "open":
            clients.ready_marker = cmd.get("ready", "event: ready").encode()
            out = await clients.open(cmd["n"], cmd["host"], cmd["port"], cmd["request"])
        elif cmd["cmd"] == "wait":
            out = await clients.wait(cmd["seqs"], cmd["count"], cmd["timeout"])
        elif cmd["cmd"] == "close":
            out = clients.close()
            await asyncio.sleep(0.2)
        else:
            out = {"error": "unknown"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


# -- the driver -----------------------------------------------------------------------------


class ClientProc:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_clients"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = await asyncio.to_thread(self.proc.stdout.readline)
        result: dict[str, Any] = json.loads(line)
        return result

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Target:
    """One server under test: how to start it, open a stream, post, count streams."""

    name = ""
    probe = ""

    async def prepare_blast(self, seqs: list[int]) -> list[Any]:
        raise NotImplementedError

    async def blast(self, session: Any, redis: Any, prepared: list[Any]) -> None:
        raise NotImplementedError

    async def active(self, session: Any) -> int:
        raise NotImplementedError

    def request(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    async def post(self, session: Any, seq: int) -> None:
        raise NotImplementedError

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.seq = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait_up(self, session: Any) -> None:
        import aiohttp

        for _ in range(300):
            try:
                async with session.get(f"http://127.0.0.1:{self.port}{self.probe}") as resp:
                    if resp.status < 500:
                        return
            except (OSError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class HeraldTarget(Target):
    probe = "/health"

    def __init__(self, port: int, env: dict[str, str], gc_tune: bool = True) -> None:
        super().__init__(port)
        self.name = "herald" if gc_tune else "herald-nogc"
        self.env = env
        self.gc_tune = gc_tune
        self.token = ""
        self.channel_id = 0

    def start(self) -> None:
        args = [sys.executable, __file__, "_herald_server"] + ([] if self.gc_tune else ["--no-gc"])
        self.proc = subprocess.Popen(
            args, env={**os.environ, **self.env, "HERALD_PORT": str(self.port)}
        )

    def request(self) -> str:
        return (
            f"GET /api/v1/channels/{self.channel_id}/events HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {self.token}\r\n\r\n"
        )

    async def post(self, session: Any, seq: int) -> None:
        url = f"http://127.0.0.1:{self.port}/api/v1/channels/{self.channel_id}/messages"
        async with session.post(
            url, json={"body": f"mk:{seq}:"}, headers={"Authorization": f"Bearer {self.token}"}
        ) as resp:
            assert resp.status == 201, await resp.text()

    async def prepare_blast(self, seqs: list[int]) -> list[str]:
        """Messages committed first (one INSERT, the channel's prev_id chain kept), so the
        events the blast publishes are ones the feeds accept in order."""
        import psycopg2

        def insert() -> list[str]:
            conn = psycopg2.connect(self.env["DATABASE_URL"])
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT COALESCE(max(id), 0) FROM messages WHERE channel_id = %s",
                        (self.channel_id,),
                    )
                    prev = cur.fetchone()[0]
                    cur.execute(
                        "INSERT INTO messages (channel_id, author_id, body)"
                        " SELECT %s, (SELECT min(id) FROM users), 'mk:' || g || ':'"
                        " FROM unnest(%s::int[]) WITH ORDINALITY AS t(g, n) ORDER BY n"
                        " RETURNING id, author_id, body",
                        (self.channel_id, seqs),
                    )
                    rows = sorted(cur.fetchall())
                    payloads = []
                    for mid, author, body in rows:
                        cur.execute("UPDATE messages SET prev_id = %s WHERE id = %s", (prev, mid))
                        message = {
                            "id": mid,
                            "channel_id": self.channel_id,
                            "author": {"id": author, "name": "bench"},
                            "body": body,
                            "created_at": "x",
                        }
                        payloads.append(
                            json.dumps(
                                {
                                    "type": "message",
                                    "channel_id": self.channel_id,
                                    "prev_id": prev,
                                    "message": message,
                                }
                            )
                        )
                        prev = mid
                    return payloads
            finally:
                conn.close()

        return await asyncio.to_thread(insert)

    async def blast(self, session: Any, redis: Any, prepared: list[Any]) -> None:
        """Events straight onto the bus (fan-out capacity, not the REST path)."""
        from shared.constants import events_channel

        channel = events_channel(int(REDIS_URL.rsplit("/", 1)[1]))
        for payload in prepared:
            await redis.publish(channel, payload)

    async def active(self, session: Any) -> int:
        async with session.get(f"http://127.0.0.1:{self.port}/health") as resp:
            return int((await resp.json())["sse"]["active"])


class StockTarget(Target):
    name = "stock"
    probe = "/count"

    def start(self) -> None:
        script = str(Path(__file__).with_name("stock_sse.py"))
        self.proc = subprocess.Popen([sys.executable, script, str(self.port)])

    def request(self) -> str:
        return "GET /events HTTP/1.1\r\nHost: x\r\n\r\n"

    async def post(self, session: Any, seq: int) -> None:
        async with session.post(f"http://127.0.0.1:{self.port}/publish", data=f"mk:{seq}:") as r:
            assert r.status == 200

    async def prepare_blast(self, seqs: list[int]) -> list[Any]:
        return list(seqs)

    async def blast(self, session: Any, redis: Any, prepared: list[Any]) -> None:
        await asyncio.gather(*(self.post(session, s) for s in prepared))

    async def active(self, session: Any) -> int:
        async with session.get(f"http://127.0.0.1:{self.port}/count") as resp:
            return int((await resp.json())["active"])


async def measure(target: Target, clients: ClientProc, sizes: list[int]) -> dict[str, Any]:
    import aiohttp
    import redis.asyncio as aioredis

    res: dict[str, Any] = {}
    redis = aioredis.Redis.from_url(REDIS_URL)
    async with aiohttp.ClientSession() as session:
        await target.wait_up(session)
        if isinstance(target, HeraldTarget):
            async with session.post(
                f"http://127.0.0.1:{target.port}/api/v1/channels",
                json={"name": f"bench-{target.name}-{target.port}"},
                headers={"Authorization": f"Bearer {target.token}"},
            ) as resp:
                body = await resp.json()
                assert resp.status == 201, body
                target.channel_id = body["id"]
        # warm up code paths, then the baseline
        await clients.call(
            cmd="open", n=50, host="127.0.0.1", port=target.port, request=target.request()
        )
        await target.post(session, target.seq)
        target.seq += 1
        await clients.call(cmd="close")
        await asyncio.sleep(1.5)
        res["rss0"] = rss_kb(target.pid)

        async def settle() -> None:
            for _ in range(100):
                if isinstance(target, StockTarget):
                    await target.post(session, target.seq)  # wakes handlers of gone clients
                    target.seq += 1
                if await target.active(session) == 0:
                    return
                await asyncio.sleep(0.1)

        # Churn: 10 rounds of 1000 connect/disconnect. Growth is counted from the end of
        # the first round (the allocator keeps what one round needed; a leak keeps growing).
        for round_no in range(10):
            await clients.call(
                cmd="open", n=1000, host="127.0.0.1", port=target.port, request=target.request()
            )
            await clients.call(cmd="close")
            await settle()
            if round_no == 0:
                await asyncio.sleep(1.0)
                after_first = rss_kb(target.pid)
        await asyncio.sleep(1.0)
        res["churn_growth_kb"] = rss_kb(target.pid) - after_first
        res["churn_registry"] = await target.active(session)

        async def fanout(n: int, rounds: int) -> dict[str, float]:
            lat, first, posted = [], [], []
            for _ in range(rounds):
                seq = target.seq
                target.seq += 1
                t0 = time.monotonic()
                await target.post(session, seq)
                posted.append((time.monotonic() - t0) * 1000)
                got = (await clients.call(cmd="wait", seqs=[seq], count=n, timeout=30))[str(seq)]
                assert got["n"] >= n, got
                lat.append((got["last"] - t0) * 1000)
                first.append((got["first"] - t0) * 1000)
                await asyncio.sleep(0.05)
            if os.environ.get("BENCH_DEBUG"):
                print(
                    f"   {target.name} n={n} first p50 {pct(first, 0.5):.1f} ms,"
                    f" post p50 {pct(posted, 0.5):.1f} ms",
                    flush=True,
                )
                if isinstance(target, HeraldTarget):
                    async with session.get(f"http://127.0.0.1:{target.port}/metrics") as r:
                        text = await r.text()
                    vals = dict(
                        re.findall(r"^herald_sse_fanout_seconds_(sum|count) (\S+)$", text, re.M)
                    )
                    mean_ms = float(vals["sum"]) / float(vals["count"]) * 1000
                    print(f"   server-side fan-out mean {mean_ms:.2f} ms", flush=True)
            return {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": max(lat)}

        opened = 0
        for n in sizes:
            out = await clients.call(
                cmd="open",
                n=n - opened,
                host="127.0.0.1",
                port=target.port,
                request=target.request(),
            )
            assert out["failed"] == 0, out
            if n - opened >= 1000:
                res.setdefault("connect_rate", (n - opened) / out["elapsed"])
            opened = n
            await asyncio.sleep(2.0)
            res[f"rss{n}"] = rss_kb(target.pid)
            if n in (1000, 10000):
                res[f"fanout{n}"] = fanout_res = await fanout(n, 30 if n == 1000 else 15)
                del fanout_res
            if n == 1000:
                seqs = list(range(target.seq, target.seq + 100))
                target.seq += 100
                prepared = await target.prepare_blast(seqs)
                t0 = time.monotonic()
                await target.blast(session, redis, prepared)
                got = await clients.call(cmd="wait", seqs=seqs, count=n, timeout=60)
                last = max(v["last"] for v in got.values())
                total = sum(v["n"] for v in got.values())
                res["deliveries_per_s"] = total / (last - t0)
        await clients.call(cmd="close")
        await settle()
    await redis.aclose()
    return res


async def post_and_wait(
    session: Any, clients: ClientProc, port: int, token: str, channel_id: int, seq: int, n: int
) -> float:
    """Post one marked message; ms until ``n`` streams have it."""
    url = f"http://127.0.0.1:{port}/api/v1/channels/{channel_id}/messages"
    t0 = time.monotonic()
    async with session.post(
        url, json={"body": f"mk:{seq}:"}, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 201, await resp.text()
    got = (await clients.call(cmd="wait", seqs=[seq], count=n, timeout=30))[str(seq)]
    assert got["n"] >= n, got
    return float((got["last"] - t0) * 1000)


async def make_channels(session: Any, port: int, token: str, prefix: str, k: int) -> list[int]:
    ids = []
    for i in range(k):
        async with session.post(
            f"http://127.0.0.1:{port}/api/v1/channels",
            json={"name": f"{prefix}-{i}"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            body = await resp.json()
            assert resp.status == 201, body
            ids.append(body["id"])
    return ids


async def measure_multi(target: HeraldTarget, clients: ClientProc, n: int) -> dict[str, Any]:
    """``n`` multi-channel streams over 20 channels each; posts spread over the channels."""
    import aiohttp

    res: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        await target.wait_up(session)
        channels = await make_channels(session, target.port, target.token, "multi", 20)
        request = (
            f"GET /api/v1/events?channels={','.join(map(str, channels))} HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: Bearer {target.token}\r\n\r\n"
        )
        rss0 = rss_kb(target.pid)
        out = await clients.call(
            cmd="open", n=n, host="127.0.0.1", port=target.port, request=request
        )
        assert out["failed"] == 0, out
        await asyncio.sleep(2.0)
        res["multi_kbper"] = (rss_kb(target.pid) - rss0) / n
        lat = []
        for i in range(40):
            seq = target.seq
            target.seq += 1
            lat.append(
                await post_and_wait(
                    session, clients, target.port, target.token, channels[i % 20], seq, n
                )
            )
            await asyncio.sleep(0.05)
        res["multi_p50"], res["multi_p99"] = pct(lat, 0.5), pct(lat, 0.99)
        await clients.call(cmd="close")
    return res


async def measure_fault(env: dict[str, str], token: str, clients: ClientProc) -> dict[str, Any]:
    """Redis stopped for 5 s under 20 posts/s, 200 streams: every message still reaches
    every stream (the feeds read PostgreSQL); how long posts during the outage took to
    reach all, and after Redis came back."""
    import aiohttp

    rport = free_port()
    redis_cmd = ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", ""]
    redis_cmd += ["--appendonly", "no"]
    hport = free_port()
    while hport == rport:
        hport = free_port()
    redis_proc = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
    target = HeraldTarget(hport, {**env, "REDIS_URL": f"redis://127.0.0.1:{rport}/0"})
    target.token = token
    n = 200
    res: dict[str, Any] = {}
    try:
        for _ in range(100):
            ping = subprocess.run(
                ["redis-cli", "-p", str(rport), "ping"], capture_output=True, text=True
            )
            if ping.stdout.strip() == "PONG":
                break
            await asyncio.sleep(0.05)
        target.start()
        async with aiohttp.ClientSession() as session:
            await target.wait_up(session)
            (channel,) = await make_channels(session, target.port, token, "fault", 1)
            target.channel_id = channel
            out = await clients.call(
                cmd="open", n=n, host="127.0.0.1", port=target.port, request=target.request()
            )
            assert out["failed"] == 0, out
            posted: list[tuple[int, float, str]] = []
            start = time.monotonic()
            stopped_at = restarted_at = 0.0
            seq = 1_000_000
            while time.monotonic() - start < 12:
                phase = time.monotonic() - start
                if phase >= 2 and not stopped_at:
                    redis_proc.terminate()
                    redis_proc.wait()
                    stopped_at = time.monotonic()
                if phase >= 7 and not restarted_at:
                    redis_proc = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
                    restarted_at = time.monotonic()
                when = "outage" if stopped_at and not restarted_at else "normal"
                url = f"http://127.0.0.1:{target.port}/api/v1/channels/{channel}/messages"
                async with session.post(
                    url, json={"body": f"mk:{seq}:"}, headers={"Authorization": f"Bearer {token}"}
                ) as resp:
                    if resp.status == 201:
                        posted.append((seq, time.monotonic(), when))
                seq += 1
                await asyncio.sleep(0.05)
            got = await clients.call(cmd="wait", seqs=[p[0] for p in posted], count=n, timeout=30)
            outage = [(s, t) for s, t, w in posted if w == "outage"]
            late = [(got[str(s)]["last"] - t) * 1000 for s, t in outage if got[str(s)]["n"]]
            res["fault_posted"] = len(posted)
            res["fault_outage_posts"] = len(outage)
            res["fault_delivered"] = sum(got[str(s)]["n"] for s, _, _ in posted)
            res["fault_expected"] = len(posted) * n
            res["fault_p50"], res["fault_p99"] = pct(late, 0.5), pct(late, 0.99)
            caught = max(got[str(s)]["last"] for s, _ in outage) if outage else restarted_at
            res["fault_after_restart_ms"] = max(0.0, (caught - restarted_at) * 1000)
            await clients.call(cmd="close")
    finally:
        target.stop()
        redis_proc.terminate()
        redis_proc.wait()
    return res


async def setup_db(db_name: str) -> tuple[str, str]:
    import psycopg2

    from shared.db.migrate import migrate
    from shared.db.pool import Database, create_pool
    from shared.services.users import UserService

    conn = psycopg2.connect(ADMIN_PG)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{db_name}"')
        cur.execute(f'CREATE DATABASE "{db_name}"')
    conn.close()
    url = ADMIN_PG.rsplit("/", 1)[0] + "/" + db_name
    db = Database(await create_pool(url, maxsize=1))
    try:
        await migrate(db)
        _, token = await UserService(db=db).create("bench", is_admin=True)
    finally:
        await db.close()
    return url, token


def drop_db(db_name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(ADMIN_PG)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    conn.close()


def report(rows: dict[str, dict[str, Any]], sizes: list[int]) -> None:
    ref = rows.get("stock", {})

    def line(label: str, key: str, fmt: str, unit: str, better_low: bool = True) -> None:
        cells = []
        for name, r in rows.items():
            v = r.get(key)
            if v is None:
                cells.append(f"{name}: -")
                continue
            cell = f"{name}: {fmt.format(v)}{unit}"
            if name != "stock" and ref.get(key, 0) > 0 and v > 0:
                cell += f" ({v / ref[key]:.2f}x stock)"
            cells.append(cell)
        print(f"  {label:<34} " + " | ".join(cells))

    for r in rows.values():
        for n in sizes:
            if f"rss{n}" in r and n:
                r[f"kbper{n}"] = (r[f"rss{n}"] - r["rss0"]) / n
        for n in (1000, 10000):
            if f"fanout{n}" in r:
                r[f"f{n}p50"] = r[f"fanout{n}"]["p50"]
                r[f"f{n}p99"] = r[f"fanout{n}"]["p99"]
    print("\nSSE benchmark (one server process; clients in another process)")
    line("RSS at 0 streams", "rss0", "{:,.0f}", " KB")
    for n in sizes:
        line(f"RSS at {n} idle streams", f"rss{n}", "{:,.0f}", " KB")
        line(f"  per connection ({n})", f"kbper{n}", "{:.1f}", " KB")
    line("connect rate", "connect_rate", "{:,.0f}", "/s")
    for n in (1000, 10000):
        line(f"fan-out to {n}: p50 (post -> all)", f"f{n}p50", "{:.1f}", " ms")
        line(f"fan-out to {n}: p99 (post -> all)", f"f{n}p99", "{:.1f}", " ms")
    line("deliveries per second (1000 subs)", "deliveries_per_s", "{:,.0f}", "/s")
    line("churn 10x1000: RSS growth (rounds 2-10)", "churn_growth_kb", "{:,.0f}", " KB")
    line("churn: registry afterwards", "churn_registry", "{}", "")


async def driver(args: argparse.Namespace) -> None:
    sizes = [1000] if args.quick else [1000, 5000, 10000]
    db_name = f"herald_bench_{os.getpid()}"
    url, token = await setup_db(db_name)
    env = {
        "DATABASE_URL": url,
        "REDIS_URL": REDIS_URL,
        "HERALD_HOST": "127.0.0.1",
        "HERALD_SSE_MAX_PER_IP": "100",
        "HERALD_SSE_MAX_CONNECTIONS": "20000",
        "HERALD_SHUTDOWN_TIMEOUT_S": "5",
    }
    clients = ClientProc()
    rows: dict[str, dict[str, Any]] = {}
    variants: list[tuple[str, Target]] = [
        ("herald", HeraldTarget(0, env)),
        ("stock", StockTarget(0)),
    ]
    if args.compare_gc:
        variants.insert(1, ("herald-nogc", HeraldTarget(0, env, gc_tune=False)))
    try:
        for name, target in variants:
            if isinstance(target, HeraldTarget):
                target.token = token
            print(f"== {name}: measuring ...", flush=True)
            started = time.monotonic()
            target.port = free_port()
            target.start()
            try:
                rows[name] = await measure(target, clients, sizes)
                if isinstance(target, HeraldTarget) and target.gc_tune:
                    rows[name].update(await measure_multi(target, clients, 1000))
            finally:
                target.stop()
            print(f"   done in {time.monotonic() - started:.0f}s", flush=True)
        print("== herald: Redis outage under load ...", flush=True)
        fault = await measure_fault(env, token, clients)
    finally:
        clients.stop()
        drop_db(db_name)
    report(rows, sizes)
    print("\nHerald only: one stream for 20 channels, and a Redis outage")
    h = rows["herald"]
    print(f"  1000 streams x 20 channels: {h['multi_kbper']:.1f} KB per stream,")
    print(f"    post -> all 1000: p50 {h['multi_p50']:.1f} ms, p99 {h['multi_p99']:.1f} ms")
    print(
        f"  Redis stopped 5 s under 20 posts/s, 200 streams: {fault['fault_posted']} posted"
        f" ({fault['fault_outage_posts']} during the outage), delivered"
        f" {fault['fault_delivered']}/{fault['fault_expected']}"
    )
    print(
        f"    posts during the outage -> all streams: p50 {fault['fault_p50']:.0f} ms,"
        f" p99 {fault['fault_p99']:.0f} ms; all caught up"
        f" {fault['fault_after_restart_ms']:.0f} ms after Redis was back"
    )
    print(
        "\n(fan-out to herald includes the REST post, its database commit and the Redis hop;"
        " to stock, one HTTP post. Deliveries/s: events straight onto herald's bus vs"
        " concurrent posts to stock.)"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_clients":
        asyncio.run(client_main())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_herald_server":
        herald_server(gc_tune="--no-gc" not in sys.argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compare-gc", action="store_true")
    asyncio.run(driver(parser.parse_args()))


if __name__ == "__main__":
    main()
