"""Query monitoring: per-statement counts and histograms, slow queries, `degraded`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg2.errors
import pytest
from aiohttp.test_utils import TestClient

from server.keys import DB, METRICS
from shared.db import monitor as monitor_mod
from shared.db.monitor import QueryMonitor, normalise, query_scope, statement_id
from shared.db.pool import Database
from shared.metrics import Metrics
from shared.settings import Settings
from worker.context import close_context, open_context

SLOW_MS = 50
SLEEP_SQL = "SELECT pg_sleep(0.06)"  # 60 ms: over a 50 ms threshold, and short


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def monitored(db: Database) -> tuple[Database, QueryMonitor]:
    """The test pool wrapped in a Database that reports to a fresh monitor."""
    mon = QueryMonitor(slow_ms=SLOW_MS, metrics=Metrics())
    return Database(db.pool, monitor=mon), mon


def monitor_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "shared.db.monitor" and r.levelno == level
    ]


# -- normalisation -----------------------------------------------------------------------
def test_normalise_collapses_literals_comments_and_space() -> None:
    sql = """SELECT *  FROM t -- the secret comment
             WHERE a = 'o''brien' AND b = 42 AND c = -3.5e2 AND d = $x$raw$x$
             AND e = %s AND f = %(user_id)s"""
    assert normalise(sql) == (
        "SELECT * FROM t WHERE a = ? AND b = ? AND c = ? AND d = ? AND e = %s AND f = %(user_id)s"
    )


def test_normalise_keeps_identifiers_with_digits() -> None:
    assert normalise("SELECT c1, t2.x FROM t3 LIMIT 10") == "SELECT c1, t2.x FROM t3 LIMIT ?"


def test_statement_id_is_stable_and_short() -> None:
    a = statement_id("SELECT 1")
    assert a == statement_id("SELECT 1")
    assert a.startswith("select_") and len(a) == len("select_") + 10
    assert statement_id("SELECT 2") != a
    assert statement_id("").startswith("empty_")


# -- counting ----------------------------------------------------------------------------
async def test_every_statement_counted_per_shape(
    monitored: tuple[Database, QueryMonitor],
) -> None:
    db, mon = monitored
    for i in range(3):
        assert await db.fetchval("SELECT %s::int + 1", (i,)) == i + 1
    await db.fetchval("SELECT  1 ")
    await db.fetchval("SELECT 2")  # same shape as "SELECT 1" once literals are gone
    assert mon.queries_total == 5
    assert mon.statements["SELECT %s::int + ?"].calls == 3
    assert mon.statements["SELECT ?"].calls == 2
    stats = mon.statements["SELECT ?"]
    assert sum(stats.buckets) == 2 and stats.max_ms > 0
    assert mon.p95_ms() is not None


async def test_transactions_count_begin_commit_and_rollback(
    monitored: tuple[Database, QueryMonitor],
) -> None:
    db, mon = monitored
    async with db.transaction() as tx:
        await tx.fetchval("SELECT 1")
    assert {t for t in mon.statements} >= {"BEGIN", "COMMIT", "SELECT ?"}
    with pytest.raises(ZeroDivisionError):
        async with db.transaction() as tx:
            await tx.fetchval("SELECT 1")
            raise ZeroDivisionError
    assert mon.statements["ROLLBACK"].calls == 1
    assert mon.queries_total == 6
    # The connection went back to the pool clean and works.
    assert await db.fetchval("SELECT 7") == 7


async def test_failed_statement_counted_as_error(
    monitored: tuple[Database, QueryMonitor],
) -> None:
    db, mon = monitored
    with pytest.raises(psycopg2.errors.UndefinedTable):
        await db.fetch("SELECT * FROM no_such_table_here")
    assert mon.errors_total == 1
    assert mon.statements["SELECT * FROM no_such_table_here"].errors == 1
    assert mon.queries_total == 1
    with pytest.raises(psycopg2.errors.DivisionByZero):
        async with db.transaction() as tx:
            await tx.fetchval("SELECT 1 / 0")
    assert mon.errors_total == 2 and mon.statements["ROLLBACK"].calls == 1


async def test_parameters_are_never_recorded(
    monitored: tuple[Database, QueryMonitor], caplog: pytest.LogCaptureFixture
) -> None:
    db, mon = monitored
    secret = "hunter2-secret-parameter"
    caplog.set_level(logging.DEBUG)
    await db.fetchval("SELECT %s::text, pg_sleep(0.06)", (secret,))
    assert mon.slow_total == 1
    everything = repr(mon.snapshot()) + mon.metrics.render().decode()  # type: ignore[union-attr]
    everything += " ".join(r.getMessage() for r in caplog.records)
    assert secret not in everything
    assert "SELECT %s::text, pg_sleep(?)" in everything


# -- slow queries ------------------------------------------------------------------------
async def test_slow_query_counted_and_logged_once_with_duration(
    monitored: tuple[Database, QueryMonitor], caplog: pytest.LogCaptureFixture
) -> None:
    db, mon = monitored
    caplog.set_level(logging.WARNING, logger="shared.db.monitor")
    mon.record("SELECT 1", 0.001)  # a fast one (synthetic: a busy machine cannot slow it)
    await db.fetchval(SLEEP_SQL)
    assert mon.slow_total == 1
    lines = monitor_lines(caplog, logging.WARNING)
    assert len(lines) == 1
    assert lines[0].startswith("slow query ")
    assert "SELECT pg_sleep(?)" in lines[0] and "threshold 50 ms" in lines[0]
    duration = float(lines[0].split()[2])
    assert 55 <= duration < 5000
    # The same statement slow again at once: counted, folded into the next report.
    await db.fetchval(SLEEP_SQL)
    assert mon.slow_total == 2
    assert len(monitor_lines(caplog, logging.WARNING)) == 1
    assert mon.statements["SELECT pg_sleep(?)"].slow == 2
    assert mon.statements["SELECT ?"].slow == 0


def test_folded_slow_lines_reported_after_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    mon = QueryMonitor(slow_ms=10, clock=clock, min_statements=10_000, metrics=Metrics.null())
    caplog.set_level(logging.WARNING, logger="shared.db.monitor")
    for _ in range(3):
        mon.record("SELECT slow()", 0.02)
    clock.now += monitor_mod.SLOW_LOG_INTERVAL_S + 1
    mon.record("SELECT slow()", 0.03)
    lines = monitor_lines(caplog, logging.WARNING)
    assert len(lines) == 2
    assert "(+2 more slow since last report)" in lines[1]
    assert mon.slow_total == 4


def test_threshold_is_strictly_greater() -> None:
    mon = QueryMonitor(slow_ms=100, metrics=Metrics.null())
    mon.record("SELECT 1", 0.100)
    assert mon.slow_total == 0
    mon.record("SELECT 1", 0.1001)
    assert mon.slow_total == 1


# -- degraded ----------------------------------------------------------------------------
async def test_degraded_with_pg_sleep_then_alert_logged_once(
    monitored: tuple[Database, QueryMonitor], caplog: pytest.LogCaptureFixture
) -> None:
    db, mon = monitored
    caplog.set_level(logging.WARNING, logger="shared.db.monitor")
    # Fast traffic first (recorded directly, so a busy test machine cannot make it slow).
    for _ in range(monitor_mod.MIN_STATEMENTS):
        mon.record("SELECT 1", 0.001)
    assert not mon.degraded
    # 5 % of the window slow trips it: 2 slow out of 22.
    await asyncio.gather(db.fetchval(SLEEP_SQL), db.fetchval(SLEEP_SQL))
    assert mon.degraded
    alerts = monitor_lines(caplog, logging.ERROR)
    assert len(alerts) == 1 and alerts[0].startswith("ALERT database degraded: 2 of the last 22")
    await db.fetchval(SLEEP_SQL)
    assert len(monitor_lines(caplog, logging.ERROR)) == 1  # no repeat while degraded
    assert mon.metrics is not None
    assert "herald_db_degraded 1.0" in mon.metrics.render().decode()


def test_degraded_needs_enough_statements_and_recovers_when_window_passes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    mon = QueryMonitor(
        slow_ms=10,
        clock=clock,
        window_s=60,
        min_statements=20,
        slow_share=0.1,
        metrics=Metrics.null(),
    )
    caplog.set_level(logging.WARNING, logger="shared.db.monitor")
    for _ in range(5):
        mon.record("SELECT slow()", 0.5)
    assert not mon.degraded  # 100 % slow, but only 5 statements
    for _ in range(15):
        mon.record("SELECT fast()", 0.001)
    assert mon.degraded  # 5 of 20 = 25 %
    clock.now += 30
    for _ in range(40):
        mon.record("SELECT fast()", 0.001)
    assert not mon.degraded  # 5 of 60 < 10 %
    mon.record("SELECT slow()", 0.5)
    mon.record("SELECT slow()", 0.5)
    assert mon.degraded  # 7 of 62
    clock.now += 61  # everything left the window
    mon.refresh()
    assert not mon.degraded
    assert mon.window_stats()["statements"] == 0
    assert mon.p95_ms() is None
    assert any("recovered" in line for line in monitor_lines(caplog, logging.WARNING))


def test_window_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor_mod, "WINDOW_MAX", 50)
    mon = QueryMonitor(slow_ms=10, min_statements=10, slow_share=0.5, metrics=Metrics.null())
    for _ in range(50):
        mon.record("SELECT slow()", 0.5)
    assert mon.degraded
    for _ in range(50):
        mon.record("SELECT fast()", 0.001)
    stats = mon.window_stats()
    assert stats["statements"] == 50 and stats["slow"] == 0
    assert not mon.degraded


def test_p95_is_nearest_rank() -> None:
    mon = QueryMonitor(slow_ms=1000, metrics=Metrics.null())
    for ms in range(1, 101):
        mon.record("SELECT x", ms / 1000)
    assert mon.p95_ms() == 95.0
    stats = mon.statements["SELECT x"]
    assert stats.p95_ms() == 100  # bucket upper bound
    assert stats.to_json()["calls"] == 100


def test_distinct_statements_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor_mod, "MAX_STATEMENTS", 3)
    monkeypatch.setattr(monitor_mod, "RAW_CACHE_MAX", 2)
    mon = QueryMonitor(slow_ms=1000, metrics=Metrics.null())
    for table in "abcdef":
        mon.record(f"SELECT * FROM {table}", 0.001)
    # Three shapes of their own, then one shared entry for everything after them.
    assert len(mon.statements) == 4
    assert mon.statements[monitor_mod.OVERFLOW_TEXT].calls == 3
    assert len(mon._by_raw) == 2
    assert mon.queries_total == 6
    assert [s["calls"] for s in mon.top(1)] == [3]


# -- wiring: /health, /metrics, the worker -----------------------------------------------
async def test_health_db_section_and_metrics_with_pg_sleep(
    make_client: Any, settings: Settings
) -> None:
    client: TestClient[Any, Any] = await make_client(slow_query_ms=SLOW_MS)
    body = await (await client.get("/health")).json()
    db = body["db"]
    assert set(db) >= {
        "queries_total",
        "slow_queries_total",
        "slow_threshold_ms",
        "p95_ms",
        "degraded",
    }
    assert db["slow_threshold_ms"] == SLOW_MS
    assert db["degraded"] is False
    slow_before = db["slow_queries_total"]  # 0, unless a busy machine made one slow
    assert db["queries_total"] >= 1  # the health check's own SELECT 1
    app_db: Database = client.app[DB]
    for _ in range(monitor_mod.MIN_STATEMENTS):
        await app_db.fetchval("SELECT 1")
    await asyncio.gather(*(app_db.fetchval(SLEEP_SQL) for _ in range(4)))
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    db = body["db"]
    assert db["slow_queries_total"] >= slow_before + 4
    assert db["degraded"] is True
    assert body["status"] == "degraded"
    assert db["p95_ms"] >= SLOW_MS
    assert db["queries_total"] >= monitor_mod.MIN_STATEMENTS + 4
    assert any(s["statement"] == "SELECT pg_sleep(?)" for s in db["top_statements"])
    text = await (await client.get("/metrics")).text()
    assert "herald_db_degraded 1.0" in text
    assert "herald_db_query_seconds_count{statement=" in text
    assert "herald_db_slow_queries_total{statement=" in text
    # The statement is named by its id only; no SQL text is a label.
    (sleep,) = [s for s in db["top_statements"] if s["statement"] == "SELECT pg_sleep(?)"]
    sleep_id = sleep["id"]
    assert f'herald_db_query_seconds_count{{statement="{sleep_id}"}}' in text
    assert "sql=" not in text and "pg_sleep" not in text
    assert client.app[METRICS] is app_db.monitor.metrics  # type: ignore[union-attr]


async def test_worker_database_is_monitored(settings: Settings) -> None:
    wctx = await open_context(settings)
    try:
        assert wctx.db.monitor is not None
        assert wctx.db.monitor.slow_ms == settings.slow_query_ms
        assert wctx.db.monitor.metrics is wctx.metrics
        await wctx.db.fetchval("SELECT 1")
        assert wctx.db.monitor.queries_total == 1
    finally:
        await close_context(wctx)


async def test_query_scopes_are_per_task_and_inherited_by_child_tasks(
    monitored: tuple[Database, QueryMonitor],
) -> None:
    db, mon = monitored

    async def job(n: int) -> int:
        with query_scope() as scope:
            for _ in range(n):
                await db.fetchval("SELECT 1")
            # A task started inside the scope counts for it too.
            await asyncio.create_task(db.fetchval("SELECT 2"))
            return scope.statements

    assert await asyncio.gather(job(1), job(3), job(5)) == [2, 4, 6]
    await db.fetchval("SELECT 3")  # outside every scope
    assert mon.queries_total == 13
    assert mon.requests_total == 0


async def test_each_statement_id_is_logged_with_its_text_once(
    monitored: tuple[Database, QueryMonitor], caplog: pytest.LogCaptureFixture
) -> None:
    db, mon = monitored
    caplog.set_level(logging.DEBUG, logger="shared.db.monitor")
    for _ in range(3):
        await db.fetchval("SELECT 41 + 1")
    await db.fetchval("SELECT 'other'")
    (stats,) = [s for s in mon.statements.values() if s.text == "SELECT ? + ?"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("statement ")]
    assert lines.count(f"statement {stats.id}: SELECT ? + ?") == 1
    assert len(lines) == 2  # one per distinct statement, not per call
