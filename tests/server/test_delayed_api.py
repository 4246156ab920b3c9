"""The delayed-message API: validation of every field, listing, cancelling, the caps."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta

import pytest

from tests.helpers import API, expect_error, make_channel


def in_future(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def fill_queue(db, channel_id: int, author_id: int, n: int) -> None:
    """``n`` pending rows an hour ahead, straight into the table (no caps, no jobs)."""
    await db.execute(
        "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at)"
        " SELECT %s, %s, 'filler ' || g, now() + interval '1 hour'"
        " FROM generate_series(1, %s) g",
        (channel_id, author_id, n),
    )


async def test_schedule_with_delay_seconds(client, alice):
    channel = await make_channel(client, alice)
    before = datetime.now(UTC)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages",
        json={"body": "later", "delay_seconds": 60},
        headers=alice.headers,
    )
    assert resp.status == 202
    item = await resp.json()
    assert item["status"] == "pending" and item["body"] == "later"
    assert item["channel_id"] == channel and item["author_id"] == alice.id
    assert item["reason"] is None and item["message_id"] is None and item["finished_at"] is None
    due = datetime.fromisoformat(item["deliver_at"])
    assert before + timedelta(seconds=59) < due < before + timedelta(seconds=62)


async def test_schedule_with_deliver_at_offsets(client, alice):
    channel = await make_channel(client, alice)
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    local = when.astimezone(datetime.now().astimezone().tzinfo)
    for text in (
        when.isoformat().replace("+00:00", "Z"),
        when.astimezone(datetime.strptime("+05:30", "%z").tzinfo).isoformat(),
        when.strftime("%Y-%m-%dT%H:%M:%S.123456789z"),
        local.isoformat(),
    ):
        resp = await client.post(
            f"{API}/channels/{channel}/delayed-messages",
            json={"body": "x", "deliver_at": text},
            headers=alice.headers,
        )
        assert resp.status == 202, (text, await resp.text())
        got = datetime.fromisoformat((await resp.json())["deliver_at"])
        assert abs((got - when).total_seconds()) < 1, text


@pytest.mark.parametrize(
    "payload",
    [
        {"body": "x"},  # neither
        {"body": "x", "delay_seconds": 10, "deliver_at": in_future(10)},  # both
        {"body": "x", "delay_seconds": 0},
        {"body": "x", "delay_seconds": -5},
        {"body": "x", "delay_seconds": 30 * 86400 + 1},
        {"body": "x", "delay_seconds": 1e308},
        {"body": "x", "delay_seconds": "10"},
        {"body": "x", "delay_seconds": True},
        {"body": "x", "delay_seconds": [10]},
        {"body": "x", "deliver_at": "2020-01-01T00:00:00Z"},  # past
        {"body": "x", "deliver_at": in_future(31 * 86400)},  # too far
        {"body": "x", "deliver_at": "tomorrow"},
        {"body": "x", "deliver_at": "2030-01-01"},  # no time
        {"body": "x", "deliver_at": "2030-01-01T10:00:00"},  # no offset
        {"body": "x", "deliver_at": "2030-02-30T10:00:00Z"},  # no such day
        {"body": "x", "deliver_at": "2030-01-01T25:00:00Z"},
        {"body": "x", "deliver_at": "2030-01-01T10:00:00+24:00"},
        {"body": "x", "deliver_at": "0000-01-01T00:00:00Z"},
        {"body": "x", "deliver_at": "2030-01-01T10:00:00Z\x00"},
        {"body": "x", "deliver_at": "\uff12\uff10\uff13\uff10-01-01T10:00:00Z"},  # fullwidth digits
        {"body": "x", "deliver_at": "2030-01-01T10:00:00Z" + " " * 100},
        {"body": "x", "deliver_at": 1893456000},
        {"body": "", "delay_seconds": 10},
        {"body": "x" * 10_001, "delay_seconds": 10},
        {"body": "nul\x00byte", "delay_seconds": 10},
        {"body": "lone \ud800 surrogate", "delay_seconds": 10},
        {"body": None, "delay_seconds": 10},
        {"body": 5, "delay_seconds": 10},
        {"delay_seconds": 10},
        {"body": "x", "delay_seconds": 10, "channel_id": 1},  # unknown field
    ],
)
async def test_schedule_rejects_bad_fields(client, alice, payload):
    channel = await make_channel(client, alice)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages", json=payload, headers=alice.headers
    )
    await expect_error(resp, 422, "validation_error")


async def test_schedule_body_limits_count_characters(client, alice):
    channel = await make_channel(client, alice)
    url = f"{API}/channels/{channel}/delayed-messages"
    emoji = "😀" * 10_000  # 40,000 bytes, 10,000 characters
    resp = await client.post(url, json={"body": emoji, "delay_seconds": 5}, headers=alice.headers)
    assert resp.status == 202
    sql = "'); DROP TABLE delayed_messages; --"
    resp = await client.post(url, json={"body": sql, "delay_seconds": 5}, headers=alice.headers)
    assert resp.status == 202 and (await resp.json())["body"] == sql


async def test_schedule_malformed_requests(client, alice):
    channel = await make_channel(client, alice)
    url = f"{API}/channels/{channel}/delayed-messages"
    resp = await client.post(url, data=b"{not json", headers=alice.headers)
    await expect_error(resp, 400, "invalid_json")
    resp = await client.post(url, json=["body"], headers=alice.headers)
    await expect_error(resp, 422, "validation_error")
    resp = await client.post(url, data=b"\xff\xfe", headers=alice.headers)
    await expect_error(resp, 400, "invalid_json")
    resp = await client.post(url, data=io.BytesIO(b"x" * (2 * 1024 * 1024)), headers=alice.headers)
    assert resp.status == 413
    resp = await client.post(url, json={"body": "x", "delay_seconds": 5})
    await expect_error(resp, 401, "unauthorized")
    for bad in ("abc", "0", "-1", "1.5", "99999999999999999999", "%00", "..%2f..%2fetc"):
        resp = await client.post(
            f"{API}/channels/{bad}/delayed-messages",
            json={"body": "x", "delay_seconds": 5},
            headers=alice.headers,
        )
        assert resp.status in (404, 422), bad
    resp = await client.post(
        f"{API}/channels/999999/delayed-messages",
        json={"body": "x", "delay_seconds": 5},
        headers=alice.headers,
    )
    await expect_error(resp, 404, "channel_not_found")


async def test_schedule_needs_the_right_to_post(client, alice, bob):
    private = await make_channel(client, alice, "secret", private=True)
    resp = await client.post(
        f"{API}/channels/{private}/delayed-messages",
        json={"body": "x", "delay_seconds": 5},
        headers=bob.headers,
    )
    await expect_error(resp, 404, "channel_not_found")


async def test_list_own_and_filter(client, alice, bob):
    channel = await make_channel(client, alice)
    url = f"{API}/channels/{channel}/delayed-messages"
    ids = []
    for i in range(3):
        resp = await client.post(
            url, json={"body": f"m{i}", "delay_seconds": 60 + i}, headers=alice.headers
        )
        ids.append((await resp.json())["id"])
    await client.post(url, json={"body": "bob's", "delay_seconds": 60}, headers=bob.headers)
    resp = await client.delete(f"{API}/delayed-messages/{ids[0]}", headers=alice.headers)
    assert resp.status == 204

    items = (await (await client.get(f"{API}/delayed-messages", headers=alice.headers)).json())[
        "items"
    ]
    assert [i["id"] for i in items] == ids[::-1]
    pending = await client.get(f"{API}/delayed-messages?status=pending", headers=alice.headers)
    assert [i["id"] for i in (await pending.json())["items"]] == [ids[2], ids[1]]
    cancelled = await client.get(f"{API}/delayed-messages?status=cancelled", headers=alice.headers)
    (only,) = (await cancelled.json())["items"]
    assert only["id"] == ids[0] and only["status"] == "cancelled" and only["finished_at"]
    page = await client.get(
        f"{API}/delayed-messages?limit=1&before={ids[2]}", headers=alice.headers
    )
    assert [i["id"] for i in (await page.json())["items"]] == [ids[1]]
    bobs = await client.get(f"{API}/delayed-messages", headers=bob.headers)
    assert [i["body"] for i in (await bobs.json())["items"]] == ["bob's"]


@pytest.mark.parametrize(
    "query",
    [
        "status=sent",
        "status=PENDING",
        "status=pending'--",
        "status=%00",
        "limit=0",
        "limit=1001",
        "limit=x",
        "before=-1",
        "before=abc",
    ],
)
async def test_list_rejects_bad_query(client, alice, query):
    resp = await client.get(f"{API}/delayed-messages?{query}", headers=alice.headers)
    await expect_error(resp, 422, "validation_error")


async def test_cancel_cases(client, alice, bob, db):
    channel = await make_channel(client, alice)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages",
        json={"body": "x", "delay_seconds": 60},
        headers=alice.headers,
    )
    delayed_id = (await resp.json())["id"]
    url = f"{API}/delayed-messages/{delayed_id}"
    resp = await client.delete(url, headers=bob.headers)
    await expect_error(resp, 404, "delayed_message_not_found")
    assert (await client.delete(url, headers=alice.headers)).status == 204
    await expect_error(await client.delete(url, headers=alice.headers), 409, "not_pending")
    resp = await client.delete(f"{API}/delayed-messages/424242", headers=alice.headers)
    await expect_error(resp, 404, "delayed_message_not_found")
    for bad in ("abc", "0", "1e3", "99999999999999999999"):
        resp = await client.delete(f"{API}/delayed-messages/{bad}", headers=alice.headers)
        assert resp.status in (404, 422)
    assert (await client.delete(url)).status == 401
    status = await db.fetchval("SELECT status FROM delayed_messages WHERE id = %s", (delayed_id,))
    assert status == "cancelled"


async def test_concurrent_cancels_have_one_winner(client, alice):
    channel = await make_channel(client, alice)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages",
        json={"body": "x", "delay_seconds": 60},
        headers=alice.headers,
    )
    url = f"{API}/delayed-messages/{(await resp.json())['id']}"
    statuses = [
        r.status
        for r in await asyncio.gather(
            *(client.delete(url, headers=alice.headers) for _ in range(20))
        )
    ]
    assert sorted(statuses) == [204] + [409] * 19


async def test_global_cap_under_a_concurrent_burst(client, make_user, alice, db):
    """9,990 pending, 200 requests at once: exactly 10 accepted, the rest 503 queue_full."""
    channel = await make_channel(client, alice)
    await fill_queue(db, channel, alice.id, 9_990)
    users = [await make_user(f"burst{i}") for i in range(4)]
    url = f"{API}/channels/{channel}/delayed-messages"
    responses = await asyncio.gather(
        *(
            client.post(url, json={"body": f"b{i}", "delay_seconds": 600}, headers=u.headers)
            for i in range(200)
            for u in [users[i % 4]]
        )
    )
    statuses = [r.status for r in responses]
    assert statuses.count(202) == 10 and statuses.count(503) == 190, sorted(set(statuses))
    rejected = [r for r in responses if r.status == 503]
    for r in rejected[:5]:
        assert (await r.json())["error"]["code"] == "queue_full"
        assert 1 <= int(r.headers["Retry-After"]) <= 300
    pending = await db.fetchval("SELECT count(*) FROM delayed_messages WHERE status = 'pending'")
    assert pending == 10_000


async def test_one_user_cannot_fill_the_queue(make_client, make_user, db):
    """Per-user cap under a burst: exactly the cap accepted (429 for the rest); another
    user still gets in while the queue has room, and 503 only once it is full."""
    client = await make_client(queue_max=30, queue_alert=30, queue_max_per_user=10)
    mallory, carol = await make_user("mallory"), await make_user("carol")
    channel = await make_channel(client, mallory, "flood")
    url = f"{API}/channels/{channel}/delayed-messages"
    responses = await asyncio.gather(
        *(
            client.post(url, json={"body": f"f{i}", "delay_seconds": 60}, headers=mallory.headers)
            for i in range(60)
        )
    )
    statuses = [r.status for r in responses]
    assert statuses.count(202) == 10 and statuses.count(429) == 50
    rejected = next(r for r in responses if r.status == 429)
    assert (await rejected.json())["error"]["code"] == "too_many_pending"
    assert int(rejected.headers["Retry-After"]) >= 1
    resp = await client.post(url, json={"body": "mine", "delay_seconds": 60}, headers=carol.headers)
    assert resp.status == 202
    # Cancelling frees a slot for that user at once.
    first = (await responses[statuses.index(202)].json())["id"]
    assert (
        await client.delete(f"{API}/delayed-messages/{first}", headers=mallory.headers)
    ).status == 204
    resp = await client.post(
        url, json={"body": "again", "delay_seconds": 60}, headers=mallory.headers
    )
    assert resp.status == 202
    # Others fill the rest: a user under their own cap now gets 503, not 429.
    filler, dave = await make_user("filler"), await make_user("dave")
    await fill_queue(db, channel, filler.id, 30 - 11)
    resp = await client.post(url, json={"body": "over", "delay_seconds": 60}, headers=dave.headers)
    await expect_error(resp, 503, "queue_full")


async def test_schedule_queues_one_delivery_job_per_tick(client, alice, redis):
    channel = await make_channel(client, alice)
    when = in_future(120)
    url = f"{API}/channels/{channel}/delayed-messages"
    responses = await asyncio.gather(
        *(
            client.post(url, json={"body": f"t{i}", "deliver_at": when}, headers=alice.headers)
            for i in range(20)
        )
    )
    assert all(r.status == 202 for r in responses)
    jobs = [j for j in await redis.zrange("arq:queue", 0, -1) if j.startswith(b"herald:deliver:")]
    assert len(jobs) == 1
    score = await redis.zscore("arq:queue", jobs[0])
    due = datetime.fromisoformat(when).timestamp() * 1000
    assert due <= score < due + 100


async def test_global_cap_holds_across_two_server_processes(
    client, make_client, make_user, alice, db
):
    """Each process batches its own requests; the advisory lock orders the batches."""
    other = await make_client()
    channel = await make_channel(client, alice)
    await fill_queue(db, channel, (await make_user("filler")).id, 9_985)
    url = f"{API}/channels/{channel}/delayed-messages"
    responses = await asyncio.gather(
        *(
            server.post(url, json={"body": f"x{i}", "delay_seconds": 60}, headers=alice.headers)
            for i in range(120)
            for server in [client if i % 2 else other]
        )
    )
    statuses = [r.status for r in responses]
    assert statuses.count(202) == 15 and statuses.count(503) == 105
    bodies = {(await r.json())["body"] for r in responses if r.status == 202}
    stored = await db.fetch("SELECT body FROM delayed_messages WHERE body LIKE 'x%%'")
    assert {r["body"] for r in stored} == bodies


@pytest.mark.parametrize("deliver_at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
async def test_deliver_at_out_of_range_after_offset_is_422(client, alice, deliver_at):
    """A date that is valid as written but leaves datetime's range once moved to UTC."""
    channel = await make_channel(client, alice)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages",
        json={"body": "x", "deliver_at": deliver_at},
        headers=alice.headers,
    )
    await expect_error(resp, 422, "validation_error")


@pytest.mark.parametrize("sign", ["", "-"])
async def test_huge_integer_delay_seconds_is_422(client, alice, sign):
    """An integer too large for a float (valid JSON) is out of range, not a 500."""
    channel = await make_channel(client, alice)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages",
        data='{"body": "x", "delay_seconds": ' + sign + "1" + "0" * 400 + "}",
        headers={**alice.headers, "Content-Type": "application/json"},
    )
    await expect_error(resp, 422, "validation_error")
