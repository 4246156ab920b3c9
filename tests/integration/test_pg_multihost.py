"""libpq's multi-host DSN (docs/configuration.md): Herald accepts it and connects to
the first server that is up and writable, for the server's pool and ``herald migrate``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shared.db.pool import Database, create_pool, usable_host
from shared.settings import Settings
from tests.conftest import _admin, _dsn
from tests.faults.delivery_procs import ROOT, free_port


@pytest.fixture
def multihost_url() -> Iterator[str]:
    """A fresh database named by a DSN whose first host has nobody listening."""
    name = f"herald_multihost_{os.getpid()}"
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{name}"')
    real = urlsplit(_dsn(name))
    user = f"{real.username}@" if real.username else ""
    closed = free_port()
    yield (
        f"postgresql://{user}127.0.0.1:{closed},{real.hostname}:{real.port or 5432}"
        f"/{name}?target_session_attrs=read-write&connect_timeout=5"
    )
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def herald_migrate(dsn: str, cwd: Path) -> tuple[int, str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HERALD_", "CRON_", "DATABASE_", "REDIS_", "PYTEST_"))
    }
    env.update(DATABASE_URL=dsn, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "herald", "migrate",
        env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_multi_host_dsn_is_accepted_connects_and_migrates(
    multihost_url: str, tmp_path: Path
) -> None:
    settings = Settings.from_env(env={"DATABASE_URL": multihost_url}, dotenv=None)
    assert settings.database_url == multihost_url

    code, out, err = await herald_migrate(settings.database_url, tmp_path)
    assert code == 0, err
    assert out.startswith("applied: 0001_foundation.sql"), out
    code, out, err = await herald_migrate(settings.database_url, tmp_path)
    assert (code, out.strip()) == (0, "database is up to date"), err

    db = Database(await create_pool(settings.database_url, maxsize=2))
    try:
        assert await db.fetchval("SELECT count(*) FROM schema_migrations") >= 1
        # libpq skipped the closed port and took the writable server.
        assert await db.fetchval("SELECT NOT pg_is_in_recovery()") is True
        assert await db.fetchval("SHOW transaction_read_only") == "off"
    finally:
        await db.close()


async def test_a_single_host_dsn_is_left_as_it_is() -> None:
    for dsn in ("postgresql://u@db:5432/herald", "postgresql:///herald", "dbname=herald"):
        assert await usable_host(dsn, 5.0) == dsn
