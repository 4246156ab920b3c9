"""The worker's own /metrics and /health (worker/observe.py, HERALD_WORKER_METRICS_PORT)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis

from shared.metrics import Metrics
from worker.app import build_worker
from worker.observe import ArqFigures, ObserveServer, observe_app

ROOT = Path(__file__).resolve().parents[2]
_next = [26000 + (os.getpid() % 40) * 20]


def free_port() -> int:
    """A free port in this file's range (26000-26999; below the ephemeral range)."""
    for _ in range(1000):
        port = _next[0]
        _next[0] = 26000 + (port - 26000 + 1) % 1000
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 26000-26999")


async def test_metrics_and_health_of_a_worker_that_ran_jobs(settings, redis):
    metrics = Metrics()
    worker = build_worker(
        settings,
        metrics=metrics,
        burst=True,
        handle_signals=False,
        poll_delay=0.05,
        cron_jobs=[],
    )
    client = TestClient(TestServer(observe_app(worker, metrics)))
    await client.start_server()
    try:
        # Not started yet: /health says down (503), /metrics already answers.
        resp = await client.get("/health")
        assert resp.status == 503
        assert (await resp.json())["checks"] == {"started": {"ok": False, "error": "not_started"}}
        arq = ArqRedis(connection_pool=redis.connection_pool)
        await arq.enqueue_job("ping", _queue_name=worker.queue_name)
        metrics.registry.register(ArqFigures(worker))
        await worker.main()  # burst: runs the queued job, keeps the context open
        resp = await client.get("/health")
        body = await resp.json()
        assert resp.status == 200, body
        assert body["status"] == "ok" and body["role"] == "worker"
        assert body["checks"]["database"]["ok"] and body["checks"]["redis"]["ok"]
        assert body["jobs"]["complete"] == 1 and body["jobs"]["failed"] == 0
        assert 0 <= body["health_key_age_s"] < 30
        text = await (await client.get("/metrics")).text()
        assert 'herald_worker_jobs_total{result="complete"} 1.0' in text
        assert "herald_worker_health_timestamp_seconds " in text
        assert "herald_build_info{" in text and "process_cpu_seconds_total" in text
        # The worker's own services report into the same registry.
        assert "herald_db_query_seconds_count{statement=" in text
    finally:
        await worker.close()
        await client.close()


async def test_port_zero_serves_nothing(settings):
    worker = build_worker(
        replace(settings, worker_metrics_port=0), burst=True, handle_signals=False
    )
    try:
        assert (
            await ObserveServer.start(replace(settings, worker_metrics_port=0), worker, Metrics())
            is None
        )
    finally:
        await worker.close()


async def test_a_taken_port_is_logged_and_the_worker_runs_on(settings, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = replace(settings, host="127.0.0.1", worker_metrics_port=port)
        worker = build_worker(config, burst=True, handle_signals=False)
        try:
            assert await ObserveServer.start(config, worker, Metrics()) is None
        finally:
            await worker.close()
    (line,) = [r for r in caplog.records if r.name == "worker.observe"]
    assert line.levelname == "ERROR" and "HERALD_WORKER_METRICS_PORT" in line.getMessage()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - a local test URL
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


async def test_herald_worker_serves_metrics_and_health_until_it_stops(settings, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "CRON_"))}
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        PYTHONPATH=str(ROOT),
        HERALD_WORKER_METRICS_PORT=str(port),
        HERALD_UPLOAD_DIR=str(tmp_path / "uploads"),
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        status, body = 0, b""
        for _ in range(300):  # polls an answer, up to ~30 s on a loaded machine
            status, body = await asyncio.to_thread(get, f"{base}/health")
            if status == 200 or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert status == 200, (status, body, log.read_text())
        assert json.loads(body)["status"] == "ok"
        status, text = await asyncio.to_thread(get, f"{base}/metrics")
        assert status == 200
        assert b"herald_worker_jobs_total" in text and b"herald_delayed_delivered" in text
        if shutil.which("promtool"):
            check = subprocess.run(
                ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
            )
            assert check.returncode == 0, check.stdout + check.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()
    assert (await asyncio.to_thread(get, f"{base}/health"))[0] == 0  # no longer listening
