"""Delivery of due delayed messages: exactly once, lateness, permission re-check, races."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest

from shared.bus import EventBus, arq_pool
from shared.constants import events_channel
from shared.db.pool import Database, create_pool
from shared.errors import Conflict
from shared.metrics import Metrics
from shared.services.channels import ChannelService
from shared.services.delayed.delivery import DeliveryService
from shared.services.delayed.queue_stats import QueueStats
from shared.services.delayed.scheduling import DelayedMessageService
from shared.services.users import UserService


class World:
    """Users and channels made through the real services."""

    def __init__(self, db, settings, redis):
        self.db = db
        self.settings = settings
        self.bus = EventBus(redis, settings)
        self.users = UserService(db=db)
        self.channels = ChannelService(db=db, bus=self.bus)

    async def setup(self):
        self.alice, _ = await self.users.create("alice")
        self.bob, _ = await self.users.create("bob")
        self.root, _ = await self.users.create("root", is_admin=True)
        self.public = (await self.channels.create(self.alice, "public", "", False))["id"]
        self.private = (await self.channels.create(self.alice, "private", "", True))["id"]
        return self

    async def due(self, channel_id, author, body="hello", seconds_ago=1.0, n=1) -> list[int]:
        rows = await self.db.fetch(
            "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at)"
            " SELECT %s, %s, %s || CASE WHEN %s > 1 THEN ' ' || g ELSE '' END,"
            "        now() - %s * interval '1 second'"
            " FROM generate_series(1, %s) g RETURNING id",
            (channel_id, author.id, body, n, seconds_ago, n),
        )
        return [r["id"] for r in rows]

    def delivery(self, db=None, **kw) -> DeliveryService:
        return DeliveryService(
            db=db or self.db, bus=self.bus, settings=self.settings, metrics=Metrics.null(), **kw
        )


@pytest.fixture
async def world(db, settings, redis):
    return await World(db, settings, redis).setup()


@pytest.fixture
async def other_db(settings):
    """A second pool: another "worker process" on the same database."""
    database = Database(await create_pool(settings.database_url, maxsize=5))
    yield database
    await database.close()


async def statuses(db, ids):
    rows = await db.fetch(
        "SELECT id, status, reason, message_id FROM delayed_messages WHERE id = ANY(%s)", (ids,)
    )
    return {r["id"]: r for r in rows}


async def wait_for_lock_waiters(db, n, deadline_s=10.0):
    """Poll until ``n`` backends of this database wait on a lock."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{n} lock waiter(s) never appeared")


async def test_due_messages_are_posted_and_published(world, db, redis, settings):
    pubsub = redis.pubsub()
    await pubsub.subscribe(events_channel(settings.redis_db))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    (due,) = await world.due(world.public, world.alice, "due now")
    (later,) = await world.due(world.public, world.alice, "not yet", seconds_ago=-3600)
    report = await world.delivery().deliver_due()
    assert (report.delivered, report.failed, report.batches) == (1, 0, 1)
    rows = await statuses(db, [due, later])
    assert rows[due]["status"] == "delivered" and rows[later]["status"] == "pending"
    message = await db.fetchrow("SELECT * FROM messages WHERE id = %s", (rows[due]["message_id"],))
    assert message["body"] == "due now" and message["author_id"] == world.alice.id
    assert message["channel_id"] == world.public
    event = None
    deadline = time.monotonic() + 5
    while event is None and time.monotonic() < deadline:
        event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    await pubsub.aclose()
    data = json.loads(event["data"])
    assert data["type"] == "message" and data["message"]["id"] == message["id"]
    assert data["message"]["author"] == {"id": world.alice.id, "name": "alice"}
    # Nothing is due any more: a second pass does nothing.
    again = await world.delivery().deliver_due()
    assert (again.delivered, again.failed) == (0, 0)


async def test_too_late_is_failed_not_sent(world, db, settings):
    delivery = world.delivery()
    delivery.settings = replace(settings, delivery_max_lateness_s=300)
    (late,) = await world.due(world.public, world.alice, "late", seconds_ago=301)
    (ok,) = await world.due(world.public, world.alice, "just in time", seconds_ago=290)
    report = await delivery.deliver_due()
    assert (report.delivered, report.failed, report.reasons) == (1, 1, {"too_late": 1})
    rows = await statuses(db, [late, ok])
    assert (rows[late]["status"], rows[late]["reason"]) == ("failed", "too_late")
    assert rows[ok]["status"] == "delivered"
    assert await db.fetchval("SELECT count(*) FROM messages") == 1


async def test_permission_is_rechecked_at_delivery(world, db):
    # bob joins the private channel, schedules, then is removed before delivery.
    await world.channels.add_member(world.alice, world.private, world.bob.id)
    (removed,) = await world.due(world.private, world.bob, "after removal")
    await world.channels.remove_member(world.alice, world.private, world.bob.id)
    (admin_ok,) = await world.due(world.private, world.root, "admins may")
    (public_ok,) = await world.due(world.public, world.bob, "public, not a member")
    doomed = (await world.channels.create(world.alice, "doomed", "", False))["id"]
    (gone,) = await world.due(doomed, world.alice, "channel deleted")
    await world.channels.delete(world.alice, doomed)
    report = await world.delivery().deliver_due()
    assert report.delivered == 2 and report.reasons == {"not_allowed": 1, "channel_deleted": 1}
    rows = await statuses(db, [removed, admin_ok, public_ok, gone])
    assert (rows[removed]["status"], rows[removed]["reason"]) == ("failed", "not_allowed")
    assert (rows[gone]["status"], rows[gone]["reason"]) == ("failed", "channel_deleted")
    assert rows[admin_ok]["status"] == rows[public_ok]["status"] == "delivered"
    bodies = {r["body"] for r in await db.fetch("SELECT body FROM messages")}
    assert bodies == {"admins may", "public, not a member"}


async def test_two_workers_deliver_each_message_exactly_once(world, db, other_db):
    ids = await world.due(world.public, world.alice, "m", n=600)
    one = world.delivery(batch_size=25, parallel=3)
    two = world.delivery(db=other_db, batch_size=25, parallel=3)
    first, second = await asyncio.gather(one.deliver_due(), two.deliver_due())
    assert first.delivered + second.delivered == 600
    assert first.delivered > 0 and second.delivered > 0  # both really worked
    rows = await statuses(db, ids)
    assert {r["status"] for r in rows.values()} == {"delivered"}
    assert len({r["message_id"] for r in rows.values()}) == 600
    assert await db.fetchval("SELECT count(*) FROM messages") == 600
    assert await db.fetchval("SELECT count(DISTINCT body) FROM messages") == 600


async def make_delayed_service(world, arq):
    metrics = Metrics()
    stats = QueueStats(db=world.db, redis=arq, settings=world.settings, metrics=metrics)
    return DelayedMessageService(
        db=world.db, arq=arq, settings=world.settings, metrics=metrics, stats=stats
    )


async def test_cancel_waits_for_a_delivery_in_flight_and_loses(world, db, other_db, settings):
    arq = await arq_pool(settings)
    try:
        delayed = await make_delayed_service(world, arq)
        (row,) = await world.due(world.public, world.alice, "raced")
        async with other_db.transaction() as tx:
            # Holding the author's row stalls the delivery inside its transaction (the
            # message insert's foreign-key check waits), with the delayed row locked.
            await tx.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (world.alice.id,))
            delivering = asyncio.create_task(world.delivery(parallel=1).deliver_due())
            await wait_for_lock_waiters(other_db, 1)
            cancelling = asyncio.create_task(delayed.cancel(world.alice, row))
            await wait_for_lock_waiters(other_db, 2)
        report = await delivering
        with pytest.raises(Conflict) as exc:
            await cancelling
        assert exc.value.code == "not_pending" and report.delivered == 1
        assert (await statuses(db, [row]))[row]["status"] == "delivered"
        assert await db.fetchval("SELECT count(*) FROM messages") == 1
    finally:
        await arq.aclose()


async def test_delivery_skips_a_row_being_cancelled(world, db, other_db):
    (row,) = await world.due(world.public, world.alice, "cancel wins")
    async with other_db.transaction() as tx:
        await tx.execute(
            "UPDATE delayed_messages SET status = 'cancelled', finished_at = now() WHERE id = %s",
            (row,),
        )
        report = await world.delivery().deliver_due()
        assert report.delivered == 0  # skipped, not waited for
    assert (await world.delivery().deliver_due()).delivered == 0
    assert (await statuses(db, [row]))[row]["status"] == "cancelled"
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_cancels_racing_delivery_never_give_both(world, db, settings):
    arq = await arq_pool(settings)
    try:
        delayed = await make_delayed_service(world, arq)
        ids = await world.due(world.public, world.alice, "race", n=150)

        async def cancel(i):
            try:
                await delayed.cancel(world.alice, i)
                return "cancelled"
            except Conflict:
                return "conflict"

        outcomes = await asyncio.gather(
            world.delivery(batch_size=10, parallel=2).deliver_due(), *(cancel(i) for i in ids)
        )
        report, answers = outcomes[0], dict(zip(ids, outcomes[1:], strict=True))
        rows = await statuses(db, ids)
        for i in ids:
            expected = "cancelled" if answers[i] == "cancelled" else "delivered"
            assert rows[i]["status"] == expected
        delivered = [i for i in ids if rows[i]["status"] == "delivered"]
        assert report.delivered == len(delivered)
        messages = await db.fetch("SELECT id FROM messages")
        assert sorted(m["id"] for m in messages) == sorted(rows[i]["message_id"] for i in delivered)
    finally:
        await arq.aclose()


async def test_delivered_messages_count_as_posted_and_failed_ones_do_not(world, settings):
    metrics = Metrics.null()
    await world.due(world.public, world.alice, "on time", n=3)
    await world.due(world.public, world.alice, "too late", seconds_ago=3600)
    delivery = DeliveryService(db=world.db, bus=world.bus, settings=settings, metrics=metrics)
    report = await delivery.deliver_due()
    assert (report.delivered, report.failed) == (3, 1)
    text = metrics.render().decode()
    assert 'herald_messages_posted_total{source="delayed"} 3.0' in text
    assert 'herald_delayed_delivered_total{outcome="failed_too_late"} 1.0' in text
