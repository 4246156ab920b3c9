"""Statements per request, counted by the app's own query monitor, end to end over HTTP.

Every figure here is what the request's query scope counted (the app's outermost
middleware opens one per request; BEGIN and COMMIT count as statements). Background
loops of the app run outside any request, so they never blur these figures.
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from server.keys import DB, METRICS
from shared.db.pool import Database
from tests.conftest import AuthUser, UserFactory
from tests.helpers import API


def total(client: TestClient[Any, Any]) -> int:
    monitor = client.app[DB].monitor
    assert monitor is not None
    return monitor.request_statements_total


async def counted(
    client: TestClient[Any, Any], method: str, path: str, user: AuthUser, **kw: Any
) -> tuple[int, Any]:
    """(statements the request ran, its JSON body)."""
    before = total(client)
    resp = await client.request(method, API + path, headers=user.headers, **kw)
    assert resp.status < 300, await resp.text()
    body = await resp.json() if resp.status != 204 else None
    return total(client) - before, body


async def seed_channels(
    db: Database, owner: int, authors: list[int], n: int, prefix: str = "bulk"
) -> None:
    """``n`` channels (every 4th private), the owner in each, 3 messages from different
    authors in each, and read markers at the first message."""
    await db.execute(
        "INSERT INTO channels (name, is_private, created_by)"
        " SELECT %s || '-' || g, g %% 4 = 0, %s FROM generate_series(1, %s) g",
        (prefix, owner, n),
    )
    new = "SELECT id FROM channels WHERE name LIKE %s"
    like = prefix + "-%"
    await db.execute(
        f"INSERT INTO channel_members (channel_id, user_id) SELECT id, %s FROM ({new}) c"
        " ON CONFLICT DO NOTHING",
        (owner, like),
    )
    await db.execute(
        "INSERT INTO messages (channel_id, author_id, body)"
        " SELECT c.id, (%s::bigint[])[1 + (c.id + k) %% %s], 'm' || k"
        f" FROM ({new}) c, generate_series(1, 3) k",
        (authors, len(authors), like),
    )
    await db.execute(
        "UPDATE channel_members cm SET last_read_message_id ="
        " (SELECT min(id) FROM messages m WHERE m.channel_id = cm.channel_id)"
        f" WHERE cm.channel_id IN ({new})",
        (like,),
    )


async def test_listing_is_one_statement_whatever_the_page_size(
    client: TestClient[Any, Any], app_db: Database, alice: AuthUser, make_user: UserFactory
) -> None:
    authors = [alice.id] + [(await make_user(f"author{i}")).id for i in range(4)]
    await seed_channels(app_db, alice.id, authors, 10)
    cold, _ = await counted(client, "GET", "/channels?limit=1000", alice)
    # The token lookup (then cached), its first use recorded (then once a minute at
    # most), and the listing.
    assert cold == 3
    small, page = await counted(client, "GET", "/channels?limit=1000", alice)
    assert small == 1 and len(page["items"]) == 10
    await seed_channels(app_db, alice.id, authors, 300, prefix="more")
    big, page = await counted(client, "GET", "/channels?limit=1000", alice)
    assert big == 1 and len(page["items"]) == 310
    item = page["items"][-1]
    assert item["member_count"] == 1
    assert item["last_message"]["author"]["name"] in {"alice"} | {f"author{i}" for i in range(4)}
    assert item["unread_count"] == 2
    one, page = await counted(client, "GET", "/channels?limit=1", alice)
    assert one == 1 and len(page["items"]) == 1


async def test_each_cursor_page_is_one_statement(
    client: TestClient[Any, Any], app_db: Database, alice: AuthUser
) -> None:
    await seed_channels(app_db, alice.id, [alice.id], 25)
    await counted(client, "GET", "/me", alice)  # cache the token
    seen: list[int] = []
    cursor = ""
    while True:
        n, page = await counted(client, "GET", f"/channels?limit=7{cursor}", alice)
        assert n == 1
        seen += [c["id"] for c in page["items"]]
        if not page["next_cursor"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert len(seen) == len(set(seen)) == 25


async def test_non_member_listing_is_one_statement(
    client: TestClient[Any, Any], app_db: Database, alice: AuthUser, bob: AuthUser
) -> None:
    await seed_channels(app_db, alice.id, [alice.id], 40)
    await counted(client, "GET", "/me", bob)
    n, page = await counted(client, "GET", "/channels?limit=1000", bob)
    assert n == 1
    assert len(page["items"]) == 30  # every 4th is private to alice
    assert all(c["unread_count"] == 0 for c in page["items"])


async def test_cached_channel_detail_costs_zero_statements(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    _, channel = await counted(client, "POST", "/channels", alice, json={"name": "zero"})
    cold, _ = await counted(client, "GET", f"/channels/{channel['id']}", alice)
    assert cold == 1  # the token was cached by the POST; one detail load
    for _ in range(5):
        warm, body = await counted(client, "GET", f"/channels/{channel['id']}", alice)
        assert warm == 0
        assert body["name"] == "zero" and body["member_count"] == 1


async def test_message_pages_with_authors_are_constant(
    client: TestClient[Any, Any], app_db: Database, alice: AuthUser, make_user: UserFactory
) -> None:
    authors = [alice.id] + [(await make_user(f"writer{i}")).id for i in range(9)]
    _, channel = await counted(client, "POST", "/channels", alice, json={"name": "chat"})
    cid = channel["id"]
    await app_db.execute(
        "INSERT INTO messages (channel_id, author_id, body)"
        " SELECT %s, (%s::bigint[])[1 + k %% 10], 'n' || k FROM generate_series(1, 200) k",
        (cid, authors),
    )
    counts = {}
    for limit in (5, 50, 200):
        n, page = await counted(client, "GET", f"/channels/{cid}/messages?limit={limit}", alice)
        assert len(page["items"]) == limit
        assert len({m["author"]["name"] for m in page["items"]}) == min(limit, 10)
        counts[limit] = n
    # Visibility, the page with its authors, the read marker: 3, whatever the limit (the
    # marker update only moves on the first read, but it is issued every time).
    assert len(set(counts.values())) == 1 and counts[5] <= 3


async def test_posting_is_a_fixed_number_of_statements(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    _, channel = await counted(client, "POST", "/channels", alice, json={"name": "post"})
    counts = set()
    for i in range(3):
        n, _ = await counted(
            client, "POST", f"/channels/{channel['id']}/messages", alice, json={"body": f"b{i}"}
        )
        counts.add(n)
    # BEGIN, visibility, (an ordering lock,) insert with author, read marker, COMMIT: the
    # same number every time, whatever the channel holds.
    assert len(counts) == 1 and counts.pop() <= 6


async def test_background_statements_stay_out_of_request_counts(
    client: TestClient[Any, Any], alice: AuthUser, app_db: Database
) -> None:
    monitor = client.app[DB].monitor
    assert monitor is not None
    await counted(client, "GET", "/me", alice)
    requests_before = monitor.requests_total
    before_all, before_requests = monitor.queries_total, monitor.request_statements_total
    await app_db.fetchval("SELECT 1")  # not inside any request
    assert monitor.queries_total >= before_all + 1  # (the app's own loops may add more)
    assert monitor.request_statements_total == before_requests
    n, _ = await counted(client, "GET", "/me", alice)
    assert n == 0 and monitor.requests_total == requests_before + 1
    text = client.app[METRICS].render().decode()
    assert 'herald_db_statements_per_request_count{route="/api/v1/me"} 2.0' in text
