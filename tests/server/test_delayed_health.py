"""``/health`` → ``queue`` and the queue metrics: shared figures, alert, cleanup failures."""

from __future__ import annotations

from shared.metrics import Metrics
from shared.services.delayed.cleanup import CleanupService
from shared.services.delayed.queue_stats import QueueStats
from tests.health_fields import CLEANUP_FIELDS, CONTRACT_FIELDS
from tests.helpers import API, make_channel


async def schedule(client, user, channel, n):
    for i in range(n):
        resp = await client.post(
            f"{API}/channels/{channel}/delayed-messages",
            json={"body": f"h{i}", "delay_seconds": 600},
            headers=user.headers,
        )
        assert resp.status == 202


async def queue_of(client):
    resp = await client.get("/health")
    body = await resp.json()
    return body["status"], body["queue"]


async def test_queue_section_shape_when_empty(client, settings):
    _, queue = await queue_of(client)
    assert set(queue) >= CONTRACT_FIELDS["queue"] and set(queue["cleanup"]) >= CLEANUP_FIELDS
    assert queue["size"] == 0 and queue["max_seen"] == 0 and queue["alert"] is False
    assert queue["max_size"] == settings.queue_max
    assert queue["alert_threshold"] == settings.queue_alert
    assert queue["cleanup"]["runs"] == 0 and queue["cleanup"]["success_rate"] is None


async def test_two_servers_report_the_same_figures(client, make_client, alice, db, redis, settings):
    other = await make_client()
    channel = await make_channel(client, alice)
    await schedule(client, alice, channel, 4)
    await schedule(other, alice, channel, 3)
    # The worker's sampler writes the history both servers read.
    await QueueStats(db=db, redis=redis, settings=settings, metrics=Metrics()).sample()
    _, one = await queue_of(client)
    _, two = await queue_of(other)
    assert one == two
    assert one["size"] == 7 and one["max_seen"] == 7
    assert one["samples"] == 1 and one["avg_size"] == 7 and one["growth_per_min"] == 0.0


async def test_alert_degrades_health(make_client, alice, make_user):
    client = await make_client(queue_max=10, queue_alert=3)
    bob = await make_user("bob2")
    channel = await make_channel(client, bob)
    await schedule(client, bob, channel, 2)
    status, queue = await queue_of(client)
    assert queue["alert"] is False
    await schedule(client, bob, channel, 1)
    status, queue = await queue_of(client)
    assert queue["alert"] is True and queue["size"] == 3 and queue["alert_threshold"] == 3
    assert status == "degraded"
    metrics = await (await client.get("/metrics")).text()
    assert "herald_delayed_queue_alert 1.0" in metrics
    assert "herald_delayed_queue_size 3.0" in metrics


async def test_cleanup_failure_shows_in_health_and_metrics(client, db, settings):
    cleanup = CleanupService(db=db, retention_s=0, batch_size=100, statement_timeout_ms=100)
    async with db.transaction() as tx:
        await tx.execute("LOCK TABLE delayed_messages IN SHARE MODE")
        failed = await cleanup.run()
    assert failed["status"] == "failed"
    _, queue = await queue_of(client)
    c = queue["cleanup"]
    assert (c["runs"], c["failures"], c["success_rate"]) == (1, 1, 0.0)
    assert c["last_run_at"] is not None and c["last_deleted"] == 0 and c["deleted_total"] == 0
    metrics = await (await client.get("/metrics")).text()
    assert "herald_delayed_cleanup_runs_total 1.0" in metrics
    assert "herald_delayed_cleanup_failures_total 1.0" in metrics
    assert "herald_delayed_cleanup_last_run_timestamp_seconds" in metrics
    # A good run afterwards moves the success rate.
    assert (await cleanup.run())["status"] == "succeeded"
    _, queue = await queue_of(client)
    assert (queue["cleanup"]["runs"], queue["cleanup"]["success_rate"]) == (2, 0.5)


async def test_rejections_are_counted(make_client, make_user):
    client = await make_client(queue_max=2, queue_alert=2, queue_max_per_user=1)
    a, b, c = [await make_user(name) for name in ("qa", "qb", "qc")]
    channel = await make_channel(client, a, "counted")
    await schedule(client, a, channel, 1)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages",
        json={"body": "x", "delay_seconds": 60},
        headers=a.headers,
    )
    assert resp.status == 429
    await schedule(client, b, channel, 1)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages",
        json={"body": "x", "delay_seconds": 60},
        headers=c.headers,
    )
    assert resp.status == 503
    metrics = await (await client.get("/metrics")).text()
    assert 'herald_delayed_rejected_total{reason="too_many_pending"} 1.0' in metrics
    assert 'herald_delayed_rejected_total{reason="queue_full"} 1.0' in metrics
    assert "herald_delayed_scheduled_total 2.0" in metrics
