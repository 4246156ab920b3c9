"""Fixtures: a real PostgreSQL database and a real Redis database for each test session.

Each pytest session creates its own database ``herald_test_<pid>`` (migrated once) and
empties it before every test; Redis uses database ``HERALD_TEST_REDIS_DB`` (default 15),
flushed before every test. Pub/sub channel names carry the DB number, so sessions on
different DB numbers never hear each other.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from server.app import init_app
from server.keys import DB, USERS
from shared.db.migrate import migrate
from shared.db.pool import Database, create_pool
from shared.models import User
from shared.settings import Settings
from tests.scratchdb import admin_exec

ADMIN_DSN = os.environ.get("HERALD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("HERALD_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("HERALD_TEST_REDIS_DB", "15"))
TEST_DB = f"herald_test_{os.getpid()}"


_admin = partial(admin_exec, ADMIN_DSN)


def _dsn(dbname: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{dbname}"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    _admin(f'DROP DATABASE IF EXISTS "{TEST_DB}"')
    _admin(f'CREATE DATABASE "{TEST_DB}"')
    url = _dsn(TEST_DB)

    async def setup() -> None:
        db = Database(await create_pool(url, maxsize=1))
        try:
            await migrate(db)
        finally:
            await db.close()

    asyncio.run(setup())
    yield url
    _admin(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    return f"{REDIS_BASE}/{REDIS_DB}"


def _truncate_all(url: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'schema_migrations'"
            )
            tables = [r[0] for r in cur.fetchall()]
            if tables:
                names = ", ".join(f'"{t}"' for t in tables)
                cur.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        conn.close()


@pytest.fixture
async def clean(database_url: str, redis_url: str) -> AsyncIterator[None]:
    """Empty tables and the Redis test DB before the test."""
    _truncate_all(database_url)
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    yield


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path, clean: None) -> Settings:
    return replace(
        Settings.from_env(env={}, dotenv=None),
        database_url=database_url,
        redis_url=redis_url,
        upload_dir=tmp_path / "uploads",
    )


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(await create_pool(settings.database_url, maxsize=5))
    yield database
    await database.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], settings: Settings
) -> TestClient[Any, Any]:
    return await aiohttp_client(init_app(settings))


@pytest.fixture
def make_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], settings: Settings
) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """Start another app (another "server process") on the same database and Redis."""

    async def make(**changes: Any) -> TestClient[Any, Any]:
        return await aiohttp_client(init_app(replace(settings, **changes)))

    return make


class UserFactory:
    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.count = 0

    async def __call__(self, name: str | None = None, *, admin: bool = False) -> AuthUser:
        self.count += 1
        user, token = await self.client.app[USERS].create(
            name or f"user{self.count}", is_admin=admin
        )
        return AuthUser(user, token)


class AuthUser:
    def __init__(self, user: User, token: str) -> None:
        self.user = user
        self.token = token
        self.id = user.id

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def make_user(client: TestClient[Any, Any]) -> UserFactory:
    return UserFactory(client)


@pytest.fixture
async def alice(make_user: UserFactory) -> AuthUser:
    return await make_user("alice")


@pytest.fixture
async def bob(make_user: UserFactory) -> AuthUser:
    return await make_user("bob")


@pytest.fixture
async def admin(make_user: UserFactory) -> AuthUser:
    return await make_user("root-admin", admin=True)


@pytest.fixture
def app_db(client: TestClient[Any, Any]) -> Database:
    return client.app[DB]
