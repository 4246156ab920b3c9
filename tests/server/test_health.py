"""``GET /health`` (status, checks, contract fields, nothing secret) and ``GET /metrics``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.keys import DB, DRAINING
from shared.constants import WORKER_HEALTH_KEY
from shared.settings import Settings
from tests.conftest import AuthUser
from tests.health_fields import CLEANUP_FIELDS, CONTRACT_FIELDS
from tests.helpers import make_channel
from worker.app import build_worker

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


async def get_health(client: TestClient[Any, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/health")
    assert resp.content_type == "application/json"
    return resp.status, dict(await resp.json())


async def test_degraded_without_a_worker(client: TestClient[Any, Any]) -> None:
    status, body = await get_health(client)
    assert status == 200
    assert body["status"] == "degraded"
    checks = body["checks"]
    assert checks["database"]["ok"] is True
    assert checks["redis"]["ok"] is True
    assert checks["worker"]["ok"] is False


async def test_ok_with_a_live_worker(
    client: TestClient[Any, Any], settings: Settings, redis: aioredis.Redis
) -> None:
    # A real arq worker, once through its loop (burst): it writes the health-check key.
    worker = build_worker(settings, burst=True, handle_signals=False, poll_delay=0.1)
    try:
        await worker.async_run()
        assert await redis.exists(WORKER_HEALTH_KEY)
        status, body = await get_health(client)
        assert status == 200
        assert body["checks"]["worker"]["ok"] is True
        assert body["status"] == "ok", body
    finally:
        await worker.close()
    # A stopped worker removes its key: health notices at once.
    status, body = await get_health(client)
    assert (status, body["status"]) == (200, "degraded")
    assert body["checks"]["worker"]["ok"] is False


async def test_contract_fields_present(client: TestClient[Any, Any], settings: Settings) -> None:
    _, body = await get_health(client)
    assert body["status"] in ("ok", "degraded", "down")
    assert {"database", "redis", "worker"} <= set(body["checks"])
    for check in body["checks"].values():
        assert isinstance(check["ok"], bool)
    for section, fields in CONTRACT_FIELDS.items():
        assert fields <= set(body[section]), (section, fields - set(body[section]))
    assert set(body["queue"]["cleanup"]) >= CLEANUP_FIELDS
    assert body["sse"]["limits"] == {
        "per_ip": settings.sse_max_per_ip,
        "global": settings.sse_max_connections,
    }
    assert body["queue"]["max_size"] == settings.queue_max
    assert body["queue"]["alert_threshold"] == settings.queue_alert
    assert body["db"]["slow_threshold_ms"] == settings.slow_query_ms


async def test_no_ip_token_secret_or_path_in_health(
    make_client: MakeClient, settings: Settings, tmp_path: Path
) -> None:
    secret = "cron-secret-value-xyz"
    upload = tmp_path / "very-private-upload-dir"
    client = await make_client(cron_secret=secret, upload_dir=upload)
    resp = await client.post("/api/v1/channels", json={"name": "x"})  # some traffic first
    assert resp.status == 401
    from tests.conftest import UserFactory

    user = await UserFactory(client)("healthy")
    await client.get("/api/v1/me", headers=user.headers)
    text = await (await client.get("/health")).text()
    for needle in (
        "127.0.0.1",
        "::1",
        "localhost",
        secret,
        user.token,
        str(upload),
        str(tmp_path),
        settings.database_url,
        settings.redis_url,
        "postgres",
        "6379",
        "5432",
    ):
        assert needle not in text, needle
    json.loads(text)


async def test_down_when_database_unreachable(client: TestClient[Any, Any]) -> None:
    await client.app[DB].close()  # as if PostgreSQL went away
    status, body = await get_health(client)
    assert status == 503
    assert body["status"] == "down"
    assert body["checks"]["database"]["ok"] is False
    assert set(body["checks"]["database"]) <= {"ok", "error", "latency_ms"}


async def test_draining_is_down(client: TestClient[Any, Any]) -> None:
    client.app[DRAINING][0] = True
    try:
        status, body = await get_health(client)
    finally:
        client.app[DRAINING][0] = False
    assert status == 503
    assert body["status"] == "down"


async def test_health_ignores_credentials_and_query(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    for headers in ({}, alice.headers, {"Authorization": "Bearer garbage"}):
        resp = await client.get("/health?verbose=1&x=%00", headers=headers)
        assert resp.status == 200


async def test_metrics_is_prometheus_text(client: TestClient[Any, Any], alice: AuthUser) -> None:
    channel_id = await make_channel(client, alice, "m")
    await client.post(
        f"/api/v1/channels/{channel_id}/messages", json={"body": "x"}, headers=alice.headers
    )
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert "version=0.0.4" in resp.headers["Content-Type"]
    text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses cleanly
    assert any(name.startswith("herald_") for name in families)
    for line in text.splitlines():
        assert line.startswith(("#", "herald_", "python_", "process_"))
    assert "herald_sse_active" in families
