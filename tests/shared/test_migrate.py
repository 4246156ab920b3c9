"""migrate(): applies in order, records, is idempotent and safe when run concurrently."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg2
import pytest

from shared.db.migrate import load_migrations, migrate
from shared.db.pool import Database, create_pool
from tests.conftest import _admin, _dsn

FOUNDATION_TABLES = {"users", "channels", "channel_members", "messages", "schema_migrations"}


@pytest.fixture
def fresh_url() -> Iterator[str]:
    """An empty database, dropped after the test."""
    name = f"herald_mig_{os.getpid()}"
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{name}"')
    yield _dsn(name)
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def fresh_db(fresh_url: str) -> AsyncIterator[Database]:
    db = Database(await create_pool(fresh_url, maxsize=2))
    yield db
    await db.close()


async def tables(db: Database) -> set[str]:
    rows = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def test_applies_every_migration_then_nothing(fresh_db: Database) -> None:
    names = [m.name for m in load_migrations()]
    assert names == sorted(names)
    assert names[0] == "0001_foundation.sql"
    assert await migrate(fresh_db) == names
    assert await tables(fresh_db) >= FOUNDATION_TABLES
    recorded = await fresh_db.fetch("SELECT name, checksum FROM schema_migrations ORDER BY name")
    assert [r["name"] for r in recorded] == names
    assert [r["checksum"] for r in recorded] == [m.checksum for m in load_migrations()]
    assert await migrate(fresh_db) == []
    assert await fresh_db.fetchval("SELECT count(*) FROM schema_migrations") == len(names)


async def test_indexes_the_queries_need(fresh_db: Database) -> None:
    await migrate(fresh_db)
    rows = await fresh_db.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
    names = {r["indexname"] for r in rows}
    assert {"messages_channel_id_idx", "channel_members_user_idx"} <= names
    assert "api_tokens_token_hash_key" in names  # token lookups by hash
    assert "users_token_hash_key" not in names  # 0008 moved the hashes


async def test_two_concurrent_runs_apply_once(fresh_url: str) -> None:
    pools = [Database(await create_pool(fresh_url, maxsize=1)) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(db) for db in pools))
        names = [m.name for m in load_migrations()]
        applied = [name for result in results for name in result]
        assert sorted(applied) == names  # each migration applied by exactly one run
        count = await pools[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(names)
    finally:
        for db in pools:
            await db.close()


async def test_custom_directory_order_and_checksum_warning(
    fresh_db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "0002_b.sql").write_text("INSERT INTO t VALUES (2);", encoding="utf-8")
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE t (v int);", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a migration", encoding="utf-8")
    assert await migrate(fresh_db, tmp_path) == ["0001_a.sql", "0002_b.sql"]
    (tmp_path / "0002_b.sql").write_text("INSERT INTO t VALUES (3);", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="shared.db.migrate"):
        assert await migrate(fresh_db, tmp_path) == []
    assert "0002_b.sql changed" in caplog.text
    assert await fresh_db.fetchval("SELECT array_agg(v ORDER BY v) FROM t") == [2]


async def test_failing_migration_applies_nothing(fresh_db: Database, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (v int);", encoding="utf-8")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE broken (;", encoding="utf-8")
    with pytest.raises(psycopg2.Error):
        await migrate(fresh_db, tmp_path)
    # All or nothing: the good one rolled back with the bad one.
    assert await tables(fresh_db) == set()
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE fixed (v int);", encoding="utf-8")
    assert await migrate(fresh_db, tmp_path) == ["0001_ok.sql", "0002_bad.sql"]


async def test_percent_signs_in_migrations_are_literal(fresh_db: Database, tmp_path: Path) -> None:
    (tmp_path / "0001_pct.sql").write_text(
        "CREATE TABLE p (v text DEFAULT '100%', w text DEFAULT '%s %% %(x)s');\n"
        "CREATE FUNCTION p_fail() RETURNS void LANGUAGE plpgsql AS $$\n"
        "BEGIN RAISE EXCEPTION 'refused: %', 'why'; END $$;\n",
        encoding="utf-8",
    )
    assert await migrate(fresh_db, tmp_path) == ["0001_pct.sql"]
    await fresh_db.execute("INSERT INTO p DEFAULT VALUES")
    row = await fresh_db.fetchrow("SELECT v, w FROM p")
    assert row == {"v": "100%", "w": "%s %% %(x)s"}
