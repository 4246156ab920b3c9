"""``GET|POST /api/v1/cron/cleanup-delayed-messages``: secret, wait, enqueue, result."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.constants import QUEUE_NAME
from tests.helpers import API, expect_error
from worker.app import build_worker

URL = f"{API}/cron/cleanup-delayed-messages"
SECRET = "cron-secret-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}


@pytest.fixture
async def cron_client(make_client):
    return await make_client(cron_secret=SECRET)


async def run_worker_when_queued(settings, redis, deadline_s=10.0):
    """Start a burst worker as soon as a job is in the queue (it would exit on an empty one)."""
    deadline = time.monotonic() + deadline_s
    while await redis.zcard(QUEUE_NAME) == 0:
        assert time.monotonic() < deadline, "nothing was queued"
        await asyncio.sleep(0.02)
    worker = build_worker(settings, burst=True, handle_signals=False, poll_delay=0.05)
    try:
        await worker.async_run()
    finally:
        await worker.close()


async def test_disabled_without_a_secret(client):
    for method in ("GET", "POST"):
        resp = await client.request(method, URL, headers=AUTH)
        await expect_error(resp, 503, "cron_disabled")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {SECRET}"},
        {"Authorization": f"Bearer {SECRET}x"},
        {"Authorization": f"Bearer {SECRET[:-1]}"},
        {"Authorization": f"Bearer {SECRET.upper()}"},
        {"Authorization": "Bearer ünïcödé"},
        {"Authorization": "Bearer ' OR '1'='1"},
        {"Authorization": "Bearer " + "x" * 8000},
    ],
)
async def test_wrong_or_missing_secret_is_401(cron_client, headers):
    for method in ("GET", "POST"):
        resp = await cron_client.request(method, URL, headers=headers)
        await expect_error(resp, 401, "unauthorized")


async def test_secret_in_query_or_user_token_does_not_count(cron_client, make_user):
    resp = await cron_client.get(f"{URL}?access_token={SECRET}")
    await expect_error(resp, 401, "unauthorized")
    user = await make_user("operator", admin=True)
    resp = await cron_client.get(URL, headers=user.headers)
    await expect_error(resp, 401, "unauthorized")


@pytest.mark.parametrize(
    "wait", ["-1", "301", "abc", "1.5", "1e2", "99999999999999999999", "%00", "0x10"]
)
async def test_bad_wait_is_422(cron_client, wait, redis):
    resp = await cron_client.post(f"{URL}?wait={wait}", headers=AUTH)
    await expect_error(resp, 422, "validation_error")
    assert await redis.zcard(QUEUE_NAME) == 0  # nothing was queued


async def test_other_methods(cron_client):
    assert (await cron_client.head(URL, headers=AUTH)).status == 405
    assert (await cron_client.put(URL, headers=AUTH)).status == 405
    assert (await cron_client.delete(URL, headers=AUTH)).status == 405


async def test_no_worker_gives_202_with_the_job_id(cron_client, redis):
    resp = await cron_client.get(f"{URL}?wait=0", headers=AUTH)
    assert resp.status == 202
    body = await resp.json()
    assert body["job_id"].startswith("herald:cleanup-delayed-messages:")
    assert await redis.zscore(QUEUE_NAME, body["job_id"]) is not None
    resp = await cron_client.post(f"{URL}?wait=1", headers=AUTH)  # joins the queued run
    assert resp.status == 202 and (await resp.json())["job_id"] == body["job_id"]


async def test_concurrent_calls_share_one_run(cron_client, redis):
    responses = await asyncio.gather(
        *(cron_client.post(f"{URL}?wait=0", headers=AUTH) for _ in range(25))
    )
    ids = {(await r.json())["job_id"] for r in responses}
    assert len(ids) == 1 and await redis.zcard(QUEUE_NAME) == 1


async def test_runs_the_workers_cleanup_and_reports(cron_client, settings, redis, db, make_user):
    owner = await make_user("owner")
    await db.execute(
        "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at, status,"
        " reason, finished_at) SELECT 1, %s, 'old', now() - interval '3 days', 'failed',"
        " 'too_late', now() - interval '2 days' FROM generate_series(1, 2500)",
        (owner.id,),
    )
    resp, _ = await asyncio.gather(
        cron_client.post(f"{URL}?wait=30", headers=AUTH), run_worker_when_queued(settings, redis)
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "succeeded" and body["job_id"].startswith("herald:cleanup")
    assert (body["deleted"], body["batches"]) == (2500, 3)
    assert body["duration_ms"] > 0 and "error" not in body
    assert await db.fetchval("SELECT count(*) FROM delayed_messages") == 0
    # The server did not clean itself: the run was recorded by the worker's job.
    run = await db.fetchrow("SELECT job_id, status FROM delayed_cleanup_runs")
    assert run["job_id"] == body["job_id"] and run["status"] == "succeeded"
