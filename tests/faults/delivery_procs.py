"""Real processes for the delivery fault tests: an own ``redis-server`` (stopped,
frozen, restarted empty), ``herald serve`` and ``herald worker`` subprocesses on the
session's test database, SSE watchers that record every frame with its arrival time,
and the one check every test makes: each stream got what PostgreSQL committed to its
channels, once, in per-channel id order.

Nothing here sleeps to synchronise: waits poll with deadlines (tests/helpers.wait_for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import API, wait_for

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"Herald listening on http://127\.0\.0\.1:(\d+)")
# The catch-up bound the processes run with, and the slack a shared 2-core CI box needs.
CATCHUP_S = 1.0
MARGIN_S = 3.0

_taken: set[int] = set()


def free_port(lo: int = 24000, hi: int = 26000) -> int:
    """A free TCP port below the ephemeral range (32768+), not handed out before."""
    for port in range(lo + os.getpid() % 500, hi):
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


class RedisServer:
    """An own redis-server with nothing on disk: a restart comes back empty."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, timeout=5
        )
        return done.stdout.strip() == b"PONG"

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.workdir / f"redis{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        await wait_for(self._ping, 10, f"redis-server on {self.port}", interval=0.05)

    async def stop(self) -> None:
        """Shut down without saving (the next start is empty)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True
        )
        proc = self.proc
        await wait_for(lambda: proc.poll() is not None, 10, "redis-server to stop", interval=0.05)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def pause_writes(self, seconds: float) -> None:
        """Writes (PUBLISH among them) wait; reads go on (CLIENT PAUSE ... WRITE)."""
        self.cli("client", "pause", str(int(seconds * 1000)), "write")

    def unpause(self) -> None:
        self.cli("client", "unpause")

    def cli(self, *args: str) -> None:
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, timeout=5
        )
        assert done.returncode == 0 and b"ERR" not in done.stdout, done

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            await self.stop()


def process_env(database_url: str, redis_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "CRON_"))}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PYTHONPATH=str(ROOT),
        HERALD_HOST="127.0.0.1",
        HERALD_PORT="0",
        HERALD_UPLOAD_DIR=str(workdir / "uploads"),
        HERALD_SSE_CATCHUP_S=str(CATCHUP_S),
        HERALD_SSE_MAX_PER_IP="1000",
        HERALD_SHUTDOWN_TIMEOUT_S="2",
        HERALD_WORKER_METRICS_PORT="0",
        HERALD_LOG_LEVEL="info",
    )
    env.update(extra)
    return env


@dataclass
class Herald:
    """One ``herald serve`` or ``herald worker`` subprocess, its log in a file."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


@contextlib.asynccontextmanager
async def cluster(database_url: str, workdir: Path) -> AsyncIterator[Cluster]:
    """An own Redis and the processes a test starts on it; all ended afterwards."""
    redis = RedisServer(workdir / "redis")
    await redis.start()
    procs = Cluster(database_url, redis, workdir)
    try:
        yield procs
    finally:
        await procs.close()
        await redis.close()


class Cluster:
    """The processes of one test; ``close()`` ends every one of them."""

    def __init__(self, database_url: str, redis: RedisServer, workdir: Path) -> None:
        self.database_url = database_url
        self.redis = redis
        self.workdir = workdir
        self.procs: list[Herald] = []

    def env(self, **extra: str) -> dict[str, str]:
        return process_env(self.database_url, self.redis.url, self.workdir, **extra)

    def _spawn(self, what: str, env: dict[str, str]) -> Herald:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{what}{len(self.procs)}.log"
        log = open(path, "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "herald", what],
            env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        herald = Herald(proc, path)
        self.procs.append(herald)
        return herald

    async def serve(self, **extra: str) -> Herald:
        """Start ``herald serve`` and wait until it listens (and its bus is subscribed)."""
        herald = self._spawn("serve", self.env(**extra))

        def listening() -> bool:
            assert herald.proc.poll() is None, herald.text()
            found = LISTENING.search(herald.text())
            if found:
                herald.port = int(found.group(1))
            return bool(found)

        await wait_for(listening, 30, "herald serve to listen", interval=0.05)
        return herald

    async def worker(self, **extra: str) -> Herald:
        herald = self._spawn("worker", self.env(**extra))
        return herald

    async def close(self) -> None:
        for herald in self.procs:
            with contextlib.suppress(Exception):
                await herald.stop()


# -- SSE watchers -----------------------------------------------------------------------


@dataclass
class Got:
    channel_id: int
    id: int
    at: float


@dataclass
class Watch:
    """One SSE client that records what arrives. ``url`` is a full stream URL; a
    stream may be reopened with its last ``id:`` (the browser's rule: the last ``id:``
    line seen, data or not)."""

    session: aiohttp.ClientSession
    url: str
    token: str
    name: str = ""
    got: list[Got] = field(default_factory=list)
    events: list[tuple[str, Any]] = field(default_factory=list)
    last_id: str | None = None
    opens: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _resp: aiohttp.ClientResponse | None = None

    async def open(self, resume: bool = False, timeout: float = 15) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        if resume and self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        resp = await self.session.get(
            self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)
        )
        assert resp.status == 200, (self.name, resp.status, await resp.text())
        self._resp = resp
        self.opens += 1
        self.ended = asyncio.Event()
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._read(resp, ready))
        async with asyncio.timeout(timeout):
            await ready.wait()

    async def _read(self, resp: aiohttp.ClientResponse, ready: asyncio.Event) -> None:
        fields: dict[str, str] = {}
        try:
            async for raw in resp.content:
                line = raw.decode("utf-8").rstrip("\n")
                if line.startswith(":"):
                    continue
                if line:
                    name, _, value = line.partition(":")
                    fields[name] = value[1:] if value.startswith(" ") else value
                    continue
                if "id" in fields:
                    self.last_id = fields["id"]
                if "data" in fields:
                    self._dispatch(fields.get("event", "message"), json.loads(fields["data"]))
                    if fields.get("event") == "ready":
                        ready.set()
                fields = {}
        except (aiohttp.ClientError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.ended.set()

    def _dispatch(self, event: str, data: Any) -> None:
        now = time.monotonic()
        if event == "message":
            self.got.append(Got(int(data["channel_id"]), int(data["id"]), now))
        elif event != "heartbeat":
            self.events.append((event, data))

    async def drop(self) -> None:
        """The client goes away (its last id kept for a resume)."""
        if self._resp is not None:
            self._resp.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def of(self, channel_id: int) -> list[int]:
        return [g.id for g in self.got if g.channel_id == channel_id]

    def resets(self) -> list[Any]:
        return [d for e, d in self.events if e == "reset"]


# -- load and the checks ----------------------------------------------------------------


@dataclass
class Load:
    """Posts at a steady rate through several servers; what each answered."""

    answered: dict[int, float] = field(default_factory=dict)  # message id -> answer time
    statuses: dict[str, int] = field(default_factory=dict)
    slow: int = 0  # answers that took longer than the backend bound (+1 s)
    max_answer_s: float = 0.0


async def post_one(
    session: aiohttp.ClientSession, base: str, token: str, channel_id: int, body: str, load: Load
) -> None:
    started = time.monotonic()
    try:
        async with session.post(
            f"{base}{API}/channels/{channel_id}/messages",
            json={"body": body},
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            key = str(resp.status)
            if resp.status == 201:
                load.answered[int((await resp.json())["id"])] = time.monotonic()
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        key = type(exc).__name__
    load.statuses[key] = load.statuses.get(key, 0) + 1
    took = time.monotonic() - started
    load.max_answer_s = max(load.max_answer_s, took)
    if took > 6.0:
        load.slow += 1


async def committed(db: Any, channel_ids: Iterable[int]) -> dict[int, list[int]]:
    """What PostgreSQL holds for these channels, each in id order."""
    rows = await db.fetch(
        "SELECT channel_id, id FROM messages WHERE channel_id = ANY(%s) ORDER BY id",
        (list(channel_ids),),
    )
    out: dict[int, list[int]] = {c: [] for c in channel_ids}
    for r in rows:
        out[int(r["channel_id"])].append(int(r["id"]))
    return out


def missing(watch: Watch, truth: dict[int, list[int]], channels: Iterable[int]) -> int:
    got = {(g.channel_id, g.id) for g in watch.got}
    return sum(1 for c in channels for m in truth[c] if (c, m) not in got)


async def settle(
    watches: list[tuple[Watch, list[int]]], truth: dict[int, list[int]], deadline: float
) -> None:
    """Wait (polling) until every stream has every committed message or ``deadline``
    (monotonic) passes; the exact check after it says what is missing."""

    def all_there() -> bool:
        return all(missing(w, truth, cs) == 0 for w, cs in watches)

    with contextlib.suppress(AssertionError):
        await wait_for(all_there, max(0.1, deadline - time.monotonic()), "every stream")


def assert_exact(watch: Watch, truth: dict[int, list[int]], channels: Iterable[int]) -> None:
    """Every committed message of the stream's channels, once, in per-channel order."""
    for c in channels:
        got = watch.of(c)
        assert got == truth[c], (
            f"{watch.name} channel {c}: {len(got)} received, {len(set(got))} distinct,"
            f" {len(truth[c])} committed; missing {sorted(set(truth[c]) - set(got))[:10]},"
            f" extra {sorted(set(got) - set(truth[c]))[:10]}"
        )
    assert not watch.resets(), (watch.name, watch.resets())


@dataclass
class Figures:
    posted: int = 0
    delivered: int = 0
    duplicated: int = 0
    late: int = 0
    max_lateness_s: float = 0.0
    catch_up_s: float = 0.0

    def line(self) -> str:
        return (
            f"posted {self.posted}, delivered {self.delivered}, duplicated {self.duplicated},"
            f" late {self.late}, max lateness {self.max_lateness_s:.2f}s,"
            f" catch-up {self.catch_up_s:.2f}s"
        )


def figures(
    watches: list[tuple[Watch, list[int]]],
    truth: dict[int, list[int]],
    load: Load,
    bound_s: float,
    fault_end: float | None = None,
) -> Figures:
    """Deliveries counted per (stream, message); a delivery is late when it came more
    than ``bound_s`` after the message was answered (or after the fault ended, for a
    message answered during it)."""
    fig = Figures(posted=len(load.answered))
    last_arrival = 0.0
    for watch, channels in watches:
        seen: set[int] = set()
        for g in watch.got:
            if g.channel_id not in channels:
                continue
            if g.id in seen:
                fig.duplicated += 1
                continue
            seen.add(g.id)
            fig.delivered += 1
            answered = load.answered.get(g.id)
            if answered is None:
                continue
            lateness = g.at - answered
            fig.max_lateness_s = max(fig.max_lateness_s, lateness)
            if lateness > bound_s:
                fig.late += 1
            if fault_end is not None and answered <= fault_end:
                last_arrival = max(last_arrival, g.at)
    if fault_end is not None and last_arrival:
        fig.catch_up_s = max(0.0, last_arrival - fault_end)
    return fig


# -- the usual set-up ----------------------------------------------------------------


async def make_channels(session: aiohttp.ClientSession, base: str, token: str, n: int) -> list[int]:
    ids = []
    for i in range(n):
        async with session.post(
            f"{base}{API}/channels",
            json={"name": f"load-{i}"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 201, await resp.text()
            ids.append(int((await resp.json())["id"]))
    return ids


async def open_streams(
    session: aiohttp.ClientSession, bases: list[str], token: str, channels: list[int]
) -> list[tuple[Watch, list[int]]]:
    """Per server: one per-channel stream for each channel, four chosen-channel streams
    of four channels each and one membership stream (30 with two servers)."""
    out: list[tuple[Watch, list[int]]] = []
    for s, base in enumerate(bases):
        for c in channels:
            w = Watch(session, f"{base}{API}/channels/{c}/events", token, f"s{s}/one/{c}")
            out.append((w, [c]))
        for k in range(4):
            chosen = [channels[(2 * k + j + s) % len(channels)] for j in range(4)]
            url = f"{base}{API}/events?channels={','.join(map(str, chosen))}"
            out.append((Watch(session, url, token, f"s{s}/chosen/{k}"), chosen))
        out.append((Watch(session, f"{base}{API}/events", token, f"s{s}/members"), channels))
    for w, _ in out:
        await w.open()
    return out


async def run_load(
    session: aiohttp.ClientSession,
    bases: list[str],
    token: str,
    channels: list[int],
    load: Load,
    stop: asyncio.Event,
    rng: random.Random,
    rate: float = 20.0,
) -> None:
    """``rate`` posts a second, alternating servers; none waits for the one before."""
    tasks: set[asyncio.Task[None]] = set()
    n = 0
    started = time.monotonic()
    while not stop.is_set():
        base = bases[n % len(bases)]
        task = asyncio.create_task(
            post_one(session, base, token, rng.choice(channels), f"m{n}", load)
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        # The pace of the load itself, not a wait for anything.
        await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
    if tasks:
        await asyncio.gather(*tasks)
