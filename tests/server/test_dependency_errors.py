"""PostgreSQL or Redis failing under a request: 503 with Retry-After, never a 500."""

import os

import psycopg2
import pytest
import redis.exceptions
from aiohttp import web

from server.keys import USERS
from server.middlewares import DEPENDENCY_ERRORS, error_middleware
from shared.db.migrate import migrate
from shared.db.pool import Database, create_pool
from tests.conftest import ADMIN_DSN
from tests.helpers import API
from tests.scratchdb import admin_exec, dsn_for


@pytest.mark.parametrize("exc_type", [*DEPENDENCY_ERRORS, TimeoutError])
async def test_dependency_errors_map_to_503(aiohttp_client, exc_type):
    async def failing(request):
        raise exc_type("connection to 10.0.0.1:5432 refused")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/x", failing)
    client = await aiohttp_client(app)
    resp = await client.get("/x")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    body = await resp.json()
    assert body["error"]["code"] == "service_unavailable"
    assert "10.0.0.1" not in await resp.text()  # no host leaks to the client


async def test_other_errors_stay_500(aiohttp_client):
    async def failing(request):
        raise RuntimeError("bug")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/x", failing)
    client = await aiohttp_client(app)
    resp = await client.get("/x")
    assert resp.status == 500
    assert (await resp.json())["error"]["code"] == "internal_error"


async def test_database_gone_under_a_running_app_is_503(make_client):
    name = f"herald_gone_{os.getpid()}"
    admin_exec(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{name}"')
    admin_exec(ADMIN_DSN, f'CREATE DATABASE "{name}"')
    try:
        url = dsn_for(ADMIN_DSN, name)
        db = Database(await create_pool(url, maxsize=1))
        await migrate(db)
        await db.close()
        client = await make_client(database_url=url)
        _, token = await client.app[USERS].create("carol")
        headers = {"Authorization": f"Bearer {token}"}
        assert (await client.get(f"{API}/channels", headers=headers)).status == 200
        # The database disappears under the running server (its connections are
        # terminated, new ones are refused).
        admin_exec(ADMIN_DSN, f'DROP DATABASE "{name}" WITH (FORCE)')
        # (/me would still answer: the token is cached in Redis.)
        for path in ("/channels", "/delayed-messages"):
            resp = await client.get(f"{API}{path}", headers=headers)
            assert resp.status == 503, (path, await resp.text())
            assert resp.headers["Retry-After"] == "5"
            assert (await resp.json())["error"]["code"] == "service_unavailable"
    finally:
        admin_exec(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_mapped_types_are_the_driver_ones():
    assert psycopg2.OperationalError in DEPENDENCY_ERRORS
    assert redis.exceptions.ConnectionError in DEPENDENCY_ERRORS
