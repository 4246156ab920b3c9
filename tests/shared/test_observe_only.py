"""HERALD_OBSERVE_ONLY: a protective rule counts and logs what it would refuse, and lets
it through; rules not named keep refusing."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from server.keys import METRICS, STREAMS
from shared.metrics import Metrics
from shared.services.audit import AuditTrail
from shared.services.wiring import attachment_files
from shared.settings import Settings, SettingsError
from tests.attachment_helpers import audit_rows
from tests.helpers import API, make_channel, wait_for
from tests.sse_helpers import SSEReader

OLD = time.time() - 7200


def observed(metrics: Metrics, rule: str) -> float:
    value = metrics.registry.get_sample_value("herald_observe_only_total", {"rule": rule})
    return value or 0.0


def test_setting_names_rules_and_refuses_unknown_ones() -> None:
    env = {"HERALD_OBSERVE_ONLY": " SSE_limits, queue_caps ,,"}
    assert Settings.from_env(env, dotenv=None).observe_only == {"sse_limits", "queue_caps"}
    assert Settings.from_env({}, dotenv=None).observe_only == frozenset()
    for bad in ("sse", "queue_caps,rm -rf", "x" * 10_000, "orphan_deletion;DROP"):
        with pytest.raises(SettingsError) as exc:
            Settings.from_env({"HERALD_OBSERVE_ONLY": bad}, dotenv=None)
        message = str(exc.value)
        assert message.startswith("HERALD_OBSERVE_ONLY:") and "\n" not in message
        assert "sse_limits, queue_caps, orphan_deletion" in message
        assert len(message) < 200 + len(bad) and len(message.split("'")[1]) <= len(bad)


async def test_sse_limits_observed_let_streams_through(make_client, alice, caplog) -> None:
    client = await make_client(sse_max_per_ip=1, sse_max_connections=2, observe_only={"sse_limits"})
    channel = await make_channel(client, alice)
    manager, metrics = client.app[STREAMS], client.app[METRICS]
    url = f"{API}/channels/{channel}/events"
    caplog.set_level(logging.WARNING, logger="shared.enforcement")
    streams = [await client.get(url, headers=alice.headers) for _ in range(3)]
    try:
        for resp in streams:
            assert resp.status == 200
            await SSEReader(resp.content).until("ready")
        assert len(manager.streams) == 3
        # Streams 2 and 3 were over the per-address limit (1), stream 3 also over the
        # process's (2): three would-be refusals, none made.
        assert observed(metrics, "sse_limits") == 3
        assert manager.rejected["per_ip"] == 0 and manager.rejected["global"] == 0
        lines = [r.getMessage() for r in caplog.records if r.name == "shared.enforcement"]
        assert lines and all("observe-only sse_limits" in line for line in lines)
        assert len(lines) == 1  # throttled: one line per rule per 10 s
        assert "127.0.0.1" not in lines[0]
    finally:
        for resp in streams:
            resp.close()
    await wait_for(lambda: not manager.streams, 5)


async def test_rules_not_named_still_refuse(make_client, alice) -> None:
    client = await make_client(sse_max_per_ip=1, observe_only={"queue_caps"})
    channel = await make_channel(client, alice)
    url = f"{API}/channels/{channel}/events"
    first = await client.get(url, headers=alice.headers)
    try:
        await SSEReader(first.content).until("ready")
        second = await client.get(url, headers=alice.headers)
        assert second.status == 429
        assert (await second.json())["error"]["code"] == "too_many_connections"
        assert observed(client.app[METRICS], "sse_limits") == 0
    finally:
        first.close()


async def test_queue_caps_observed_admit_everything(make_client, alice, db) -> None:
    client = await make_client(
        queue_max=5, queue_alert=5, queue_max_per_user=2, observe_only={"queue_caps"}
    )
    channel = await make_channel(client, alice)
    url = f"{API}/channels/{channel}/delayed-messages"
    for i in range(7):
        resp = await client.post(
            url, json={"body": f"m{i}", "delay_seconds": 60}, headers=alice.headers
        )
        assert resp.status == 202, await resp.text()
    assert await db.fetchval("SELECT count(*) FROM delayed_messages WHERE status = 'pending'") == 7
    # Posts 3..7 were over the per-user cap (the first cap checked); none refused.
    metrics = client.app[METRICS]
    assert observed(metrics, "queue_caps") == 5
    rejected = metrics.registry.get_sample_value(
        "herald_delayed_rejected_total", {"reason": "too_many_pending"}
    )
    assert not rejected


async def test_orphan_deletion_observed_keeps_files(settings, db) -> None:
    root: Path = settings.upload_dir
    paths = []
    for i in range(3):
        path = root / "ab" / f"orphan-{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"12345")
        os.utime(path, (OLD, OLD))
        paths.append(path)
    metrics = Metrics()
    watched = replace(settings, orphan_grace_s=600, observe_only=frozenset({"orphan_deletion"}))
    scanner = attachment_files(db=db, settings=watched, metrics=metrics, audit=AuditTrail(db=db))
    summary = await scanner.orphans.scan()
    assert summary["orphans"] == 3 and summary["deleted"] == 0 and summary["orphan_bytes"] == 15
    assert all(p.exists() for p in paths)
    assert observed(metrics, "orphan_deletion") == 3
    detected = await audit_rows(db, "orphan.detected")
    assert [(r["result"], r["details"].get("observe_only")) for r in detected] == [
        ("dry_run", True)
    ] * 3
    # Enforced again: the same scan removes them.
    enforced = replace(watched, observe_only=frozenset())
    scanner = attachment_files(db=db, settings=enforced, metrics=metrics, audit=AuditTrail(db=db))
    assert (await scanner.orphans.scan())["deleted"] == 3
    assert not any(p.exists() for p in paths)
