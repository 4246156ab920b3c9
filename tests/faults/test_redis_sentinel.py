"""Redis behind Sentinel: the master is killed (SIGKILL) under load and Sentinel
promotes the replica. A real ``herald serve`` and ``herald worker`` run with
``REDIS_SENTINELS``; open streams must end with every committed message once, in
order (the contract's "Delivery guarantees"), posts after the failover must travel
the bus through the new master (not only PostgreSQL reconciliation), ``/health``
reports Redis ok again and ``herald worker --check`` passes against the new master.

Also: Sentinels that cannot be reached at start give one clean line and exit 1 (as an
unreachable REDIS_URL does), never a traceback.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from shared.constants import WORKER_HEALTH_KEY
from shared.services.users import UserService
from tests.faults.delivery_procs import (
    CATCHUP_S,
    MARGIN_S,
    ROOT,
    Cluster,
    Load,
    RedisServer,
    assert_exact,
    committed,
    free_port,
    make_channels,
    open_streams,
    post_one,
    process_env,
    run_load,
    settle,
)
from tests.faults.sentinel_procs import cli, sentinel_set
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(90)

BOUND_S = CATCHUP_S + MARGIN_S
# Only the database number (and credentials) count with Sentinels: the host is ignored.
REDIS_URL = "redis://ignored.invalid:1/3"
BUS = "herald:3:events"
RECEIVED = re.compile(r'^herald_bus_events_received_total\{type="MessagePosted"\} (\S+)$', re.M)


async def worker_check(env: dict[str, str], cwd: Path) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "herald", "worker", "--check",
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 30)


async def bus_received(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(f"{base}/metrics") as resp:
        found = RECEIVED.search(await resp.text())
    return float(found.group(1)) if found else 0.0


async def test_streams_and_worker_follow_a_sentinel_failover(database_url, db, tmp_path):
    _, token = await UserService(db=db).create("alice")
    async with sentinel_set(tmp_path / "redis") as redis:
        assert redis.master_port() == redis.redis_ports[0]
        # The Cluster's own Redis is never started: REDIS_SENTINELS stands in for it.
        procs = Cluster(database_url, RedisServer(tmp_path / "unused", port=1), tmp_path)
        extra = {"REDIS_SENTINELS": redis.sentinels_env, "REDIS_URL": REDIS_URL}
        try:
            server = await procs.serve(**extra)
            worker = await procs.worker(**extra)
            await failover(procs.env(**extra), server, worker, redis, token, db, tmp_path)
        finally:
            await procs.close()


async def failover(env, server, worker, redis, token, db, tmp_path):
    old_master = redis.redis_ports[0]

    async def worker_ok() -> bool:
        return await worker_check(env, tmp_path) == 0

    await wait_for(worker_ok, 20, "herald worker --check before the failover", interval=0.2)
    base = server.url
    async with aiohttp.ClientSession() as session:
        channels = await make_channels(session, base, token, 3)
        watches = await open_streams(session, [base], token, channels)
        load, stop = Load(), asyncio.Event()
        loader = asyncio.create_task(
            run_load(session, [base], token, channels, load, stop, random.Random(7))
        )
        try:
            await asyncio.sleep(1.0)  # steady load before the fault (its length)
            redis.kill(old_master)
            killed = time.monotonic()
            new_master = await redis.wait_failover(old_master)
            failover_s = time.monotonic() - killed
            await asyncio.sleep(1.0)  # load goes on after the failover (its length)
        finally:
            stop.set()
            await loader
        assert new_master == redis.redis_ports[1]

        # The server's one bus subscription is on the new master now ...
        await wait_for(
            lambda: cli(new_master, "pubsub", "numsub", BUS).split() == [BUS, "1"],
            10,
            "the hub to subscribe on the new master",
            interval=0.1,
        )
        # ... and posts reach the streams through it: each one is read off the bus.
        before = await bus_received(session, base)
        live = Load()
        for i in range(5):
            await post_one(session, base, token, channels[i % 3], f"after {i}", live)
        assert len(live.answered) == 5, live.statuses

        async def bus_carried_them() -> bool:
            return await bus_received(session, base) >= before + 5

        await wait_for(bus_carried_them, BOUND_S, "the bus to carry the posts", interval=0.1)

        async def redis_ok() -> bool:
            async with session.get(f"{base}/health") as resp:
                body = await resp.json()
            return bool(body["checks"]["redis"]["ok"])

        await wait_for(redis_ok, BOUND_S, "/health redis ok after the failover", interval=0.1)
        # The health key written before the kill was replicated and is still fresh: gone,
        # a passing check proves the worker writes it on the new master.
        assert cli(new_master, "-n", "3", "del", WORKER_HEALTH_KEY) == "1"
        await wait_for(worker_ok, 20, "herald worker --check after the failover", interval=0.2)

        last_answer = max([*load.answered.values(), *live.answered.values()])
        truth = await committed(db, channels)
        await settle(watches, truth, last_answer + BOUND_S)
        ended = [w.name for w, _ in watches if w.ended.is_set()]
        for w, _ in watches:
            await w.drop()
    print(
        f"\nsentinel failover in {failover_s:.2f}s: posted {len(load.answered)}"
        f" + {len(live.answered)}, answers {load.statuses}, slowest {load.max_answer_s:.2f}s"
    )
    for w, cs in watches:
        assert_exact(w, truth, cs)
    assert not ended, ended
    assert set(load.answered) | set(live.answered) <= {m for v in truth.values() for m in v}
    # Posts never wait on the lost master past the backend bound.
    assert load.slow == 0, load.max_answer_s
    for proc in (server, worker):
        assert proc.proc.poll() is None, proc.text()
        assert "Traceback" not in proc.text(), proc.text()
    assert f"Redis master 'herald' is now 127.0.0.1:{new_master}" in server.text()
    assert "worker reconnected after" in worker.text()


async def test_unreachable_sentinels_one_clean_line(database_url, tmp_path):
    """No Sentinel answers: ``herald serve`` and ``herald worker --check`` end with
    one line naming the problem (exit 1), as with an unreachable REDIS_URL."""
    closed = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    env = process_env(
        database_url, REDIS_URL, tmp_path, REDIS_SENTINELS=closed, PYTHONPATH=str(ROOT)
    )
    for args in (["serve"], ["worker", "--check"]):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "herald", *args],
            env=env, cwd=tmp_path, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        err = done.stderr.decode()
        lines = [line for line in err.splitlines() if line.startswith("herald:")]
        assert done.returncode == 1, (args, err)
        assert len(lines) == 1 and "MasterNotFoundError" in lines[0], (args, err)
        assert "Traceback" not in err, err
