"""SQL metacharacters through every text field and query parameter of the foundation API.

Three kinds of proof: (1) text fields store and return every payload verbatim; (2)
parameters that must be numbers or opaque cursors refuse payloads with a 4xx, never a
500; (3) a spy on ``Tx._run`` (the one place statements go through) shows that no
payload ever became part of an SQL text — they only ever travel as parameters — and the
tables are intact afterwards. Payloads that would sleep would make requests slow: each
request is timed.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient

from server.keys import AUTH_LIMIT
from shared.db.pool import Database, Tx
from tests.conftest import AuthUser, UserFactory
from tests.helpers import API

MARK = "inj7q"  # in every payload: lets the spy find payloads in SQL text
PAYLOADS = [
    f"{MARK}'; DROP TABLE messages; --",
    f"{MARK}' OR '1'='1",
    f'{MARK}" OR ""="',
    f"{MARK}'); DELETE FROM channels; --",
    f"{MARK}' UNION SELECT token_hash::text, name FROM users --",
    f"{MARK}' || (SELECT string_agg(encode(token_hash, 'hex'), ',') FROM users) || '",
    f"{MARK}'; SELECT pg_sleep(3); --",
    f"{MARK} %s %(user_id)s %% % %(",
    f"{MARK} $1 $$; TRUNCATE users; $$ $tag$x$tag$",
    f"{MARK} \\' \\\\ \\x00 E'\\x41'",
    f"{MARK} /* open comment",
    f"{MARK} -- line comment",
    f"{MARK}; COMMIT; BEGIN;",
    f"{MARK} `tick` [bracket] {{brace}} ; : ?",
    f"{MARK} ø'ünï\"cødé'; -- ✓ 🙂",
    f"{MARK}\t\r\n'\n--",
]
# Query parameters that must be numbers or cursors: every payload is refused.
NUMERIC_PARAMS = [
    "/channels?limit={p}",
    "/channels?cursor={p}",
    "/channels/{cid}/messages?limit={p}",
    "/channels/{cid}/messages?before={p}",
    "/channels/{cid}/messages?after={p}",
]
PATH_ROUTES = [
    ("GET", "/channels/{p}"),
    ("PATCH", "/channels/{p}"),
    ("DELETE", "/channels/{p}"),
    ("POST", "/channels/{p}/members"),
    ("DELETE", "/channels/{cid}/members/{p}"),
    ("POST", "/channels/{p}/messages"),
    ("GET", "/channels/{p}/messages"),
    ("GET", "/channels/{p}/events"),
]
SLOW_S = 2.5  # a request this slow would mean the payload's pg_sleep(3) ran


@pytest.fixture
def sql_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every (SQL text, parameters) the app runs during the test."""
    log: list[tuple[str, Any]] = []
    original = Tx._run

    async def spy(self: Tx, sql: str, params: Any) -> None:
        log.append((sql, params))
        await original(self, sql, params)

    monkeypatch.setattr(Tx, "_run", spy)
    return log


async def call(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    user: AuthUser,
    *,
    timed: bool = True,
    **kw: Any,
) -> tuple[int, Any]:
    start = time.monotonic()
    resp = await client.request(method, API + path, headers=user.headers, **kw)
    elapsed = time.monotonic() - start
    assert not timed or elapsed < SLOW_S, f"{method} {path} took {elapsed:.1f}s"
    assert resp.status < 500, f"{method} {path} -> {resp.status}: {await resp.text()}"
    if resp.content_type == "application/json":
        return resp.status, await resp.json()
    resp.close()
    return resp.status, None


def assert_only_parameters(log: list[tuple[str, Any]]) -> None:
    assert log, "the spy saw no statements"
    for sql, _ in log:
        assert MARK not in sql, f"a payload reached SQL text: {sql[:200]}"


async def table_counts(db: Database) -> dict[str, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM users) AS users,"
        " (SELECT count(*) FROM channels) AS channels,"
        " (SELECT count(*) FROM channel_members) AS members,"
        " (SELECT count(*) FROM messages) AS messages"
    )
    assert row is not None
    return dict(row)


async def test_text_fields_store_every_payload_verbatim(
    client: TestClient[Any, Any],
    alice: AuthUser,
    bob: AuthUser,
    app_db: Database,
    sql_log: list[tuple[str, Any]],
) -> None:
    for i, payload in enumerate(PAYLOADS):
        status, channel = await call(
            client, "POST", "/channels", alice, json={"name": f"c{i}", "topic": payload}
        )
        assert status == 201 and channel["topic"] == payload
        cid = channel["id"]
        status, body = await call(client, "GET", f"/channels/{cid}", bob)
        assert status == 200 and body["topic"] == payload
        renamed = payload[::-1]
        status, body = await call(
            client, "PATCH", f"/channels/{cid}", alice, json={"topic": renamed}
        )
        assert status == 200 and body["topic"] == renamed
        status, message = await call(
            client, "POST", f"/channels/{cid}/messages", alice, json={"body": payload}
        )
        assert status == 201 and message["body"] == payload
        status, page = await call(client, "GET", f"/channels/{cid}/messages", alice)
        assert [m["body"] for m in page["items"]] == [payload]
    status, listing = await call(client, "GET", "/channels?limit=1000", bob)
    assert [c["last_message"]["body"] for c in listing["items"]] == PAYLOADS
    assert [c["topic"] for c in listing["items"]] == [p[::-1] for p in PAYLOADS]
    assert_only_parameters(sql_log)
    assert any(MARK in str(params) for _, params in sql_log)  # they did travel, as values
    counts = await table_counts(app_db)
    assert counts["channels"] == counts["messages"] == len(PAYLOADS)
    assert counts["users"] == 2


async def test_user_names_store_payloads_verbatim(
    make_user: UserFactory, client: TestClient[Any, Any], sql_log: list[tuple[str, Any]]
) -> None:
    for i, payload in enumerate(PAYLOADS):
        name = payload.replace("\t", " ").replace("\r", " ").replace("\n", " ") + str(i)
        user = await make_user(name)
        status, me = await call(client, "GET", "/me", user)
        assert status == 200 and me["name"] == name.strip()
    assert_only_parameters(sql_log)


async def test_channel_names_refuse_metacharacters(
    client: TestClient[Any, Any], alice: AuthUser, sql_log: list[tuple[str, Any]]
) -> None:
    status, channel = await call(client, "POST", "/channels", alice, json={"name": "x"})
    for payload in PAYLOADS:
        for method, path, body in (
            ("POST", "/channels", {"name": payload}),
            ("PATCH", f"/channels/{channel['id']}", {"name": payload}),
        ):
            status, err = await call(client, method, path, alice, json=body)
            assert status == 422 and err["error"]["code"] == "validation_error"
    # Legal characters that mean something to SQL are just characters.
    status, body = await call(client, "POST", "/channels", alice, json={"name": "drop--table_"})
    assert status == 201 and body["name"] == "drop--table_"
    assert_only_parameters(sql_log)


@pytest.mark.parametrize("template", NUMERIC_PARAMS)
async def test_numeric_and_cursor_parameters_refuse_payloads(
    client: TestClient[Any, Any],
    alice: AuthUser,
    app_db: Database,
    sql_log: list[tuple[str, Any]],
    template: str,
) -> None:
    _, channel = await call(client, "POST", "/channels", alice, json={"name": "target"})
    await call(client, "POST", f"/channels/{channel['id']}/messages", alice, json={"body": "b"})
    before = await table_counts(app_db)
    extra = [
        "1 OR 1=1",
        "1; DROP TABLE messages",
        "1)--",
        "-1 UNION SELECT 1",
        base64.urlsafe_b64encode(b"c:1 OR 1=1").decode(),
        base64.urlsafe_b64encode(b"c:1;DROP TABLE channels").decode(),
        "0x10",
        "1e3",
    ]
    for payload in PAYLOADS + extra:
        path = template.format(p=quote(payload, safe=""), cid=channel["id"])
        status, err = await call(client, "GET", path, alice)
        assert status == 422, (path, status)
        assert err["error"]["code"] == "validation_error"
    assert await table_counts(app_db) == before
    assert_only_parameters(sql_log)


async def test_path_ids_refuse_payloads(
    client: TestClient[Any, Any],
    alice: AuthUser,
    app_db: Database,
    sql_log: list[tuple[str, Any]],
) -> None:
    _, channel = await call(client, "POST", "/channels", alice, json={"name": "paths"})
    before = await table_counts(app_db)
    for payload in [*PAYLOADS, "1 OR 1=1", "1;DROP TABLE users", "1'--"]:
        encoded = quote(payload, safe="")
        for method, template in PATH_ROUTES:
            path = template.format(p=encoded, cid=channel["id"])
            kw: dict[str, Any] = {}
            if method in ("POST", "PATCH"):
                kw["json"] = {"user_id": 1} if "members" in path else {"body": "x", "topic": "t"}
                if template == "/channels/{p}":
                    kw["json"] = {"topic": "t"}
            status, err = await call(client, method, path, alice, **kw)
            assert status in (404, 422), (method, path, status)
            assert err["error"]["code"] in ("validation_error", "not_found")
    assert await table_counts(app_db) == before
    assert_only_parameters(sql_log)


async def test_ids_in_json_bodies_refuse_payloads(
    client: TestClient[Any, Any], alice: AuthUser, sql_log: list[tuple[str, Any]]
) -> None:
    _, channel = await call(client, "POST", "/channels", alice, json={"name": "bodies"})
    for payload in [*PAYLOADS, "1 OR 1=1", "1"]:
        status, err = await call(
            client, "POST", f"/channels/{channel['id']}/members", alice, json={"user_id": payload}
        )
        assert status == 422 and err["error"]["code"] == "validation_error"
    assert_only_parameters(sql_log)


async def test_tokens_with_payloads_are_just_wrong_tokens(
    client: TestClient[Any, Any], alice: AuthUser, app_db: Database
) -> None:
    # Many bad tokens from one address: above HERALD_AUTH_FAIL_LIMIT (tests/faults/).
    client.app[AUTH_LIMIT].limit = 10_000
    for payload in PAYLOADS:
        token = payload.replace("\t", "x").replace("\r", "x").replace("\n", "x")
        resp = await client.get(f"{API}/me", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401
        resp = await client.get(f"{API}/channels/1/events?access_token={quote(payload, safe='')}")
        assert resp.status == 401
    assert (await table_counts(app_db))["users"] == 1


async def test_concurrent_payload_traffic_loses_nothing(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser, app_db: Database
) -> None:
    _, channel = await call(client, "POST", "/channels", alice, json={"name": "busy"})
    cid = channel["id"]
    await call(client, "POST", f"/channels/{cid}/members", bob, json={"user_id": bob.id})
    # Untimed: 100 requests at once queue for the pool; the spy-free proof here is that
    # nothing is lost and nothing 500s.
    posts = [
        call(
            client,
            "POST",
            f"/channels/{cid}/messages",
            who,
            timed=False,
            json={"body": f"{p} #{n}"},
        )
        for n, p in enumerate(PAYLOADS * 3)
        for who in (alice, bob)
    ]
    junk = [
        call(
            client,
            "GET",
            f"/channels/{cid}/messages?before={quote(p, safe='')}",
            alice,
            timed=False,
        )
        for p in PAYLOADS
    ]
    results = await asyncio.gather(*posts, *junk)
    assert [s for s, _ in results[: len(posts)]] == [201] * len(posts)
    assert {s for s, _ in results[len(posts) :]} == {422}
    status, page = await call(client, "GET", f"/channels/{cid}/messages?limit=1000", alice)
    assert status == 200
    bodies = sorted(m["body"] for m in page["items"])
    assert bodies == sorted(f"{p} #{n}" for n, p in enumerate(PAYLOADS * 3) for _ in range(2))
