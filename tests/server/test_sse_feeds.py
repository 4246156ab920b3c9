"""The per-channel feeds (server/sse/feeds.py) against the real database: events in any
order, lost or repeated, come out as each channel's exact sequence, once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace

import pytest

from server.keys import CHANNELS, MESSAGES, SETTINGS
from server.sse import feeds as feeds_module
from server.sse.feeds import Feeds, reconcile_interval
from shared.bus import MessagePosted
from shared.db.pool import Database
from shared.metrics import Metrics
from shared.services.messages import Posted, insert_message
from tests.helpers import make_channel


class Recorder:
    """The feeds' sink: what reaches the streams, in order."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []
        self.resets: list[tuple[int, int]] = []
        self.changed = asyncio.Event()

    def emit(self, channel_id: int, batch: Sequence[Posted]) -> None:
        self.batches.append((channel_id, [p.id for p in batch]))
        self.changed.set()

    def reset_channel(self, channel_id: int, last_id: int) -> None:
        self.resets.append((channel_id, last_id))
        self.changed.set()

    def ids(self, channel_id: int) -> list[int]:
        return [i for c, batch in self.batches if c == channel_id for i in batch]


@pytest.fixture
async def setup(client, alice):
    channel_id = await make_channel(client, alice)
    sink = Recorder()
    feeds = Feeds(
        messages=client.app[MESSAGES],
        sink=sink,
        settings=client.app[SETTINGS],
        metrics=Metrics(),
    )
    feeds.acquire(channel_id)
    await feeds.sync([channel_id])  # the feed starts at the channel's head (none yet)
    return feeds, sink, channel_id, client.app[MESSAGES].db, alice


async def store(db: Database, channel_id: int, author_id: int, n: int) -> list[Posted]:
    """Committed messages whose events the test hands over (or loses) itself."""
    out = []
    for i in range(n):
        async with db.transaction() as tx:
            out.append(await insert_message(tx, channel_id, author_id, f"m{i}"))
    return out


def event(p: Posted) -> MessagePosted:
    return MessagePosted(p.channel_id, p.prev_id, p.message)


async def test_out_of_order_events_come_out_in_order(setup):
    feeds, sink, channel_id, db, alice = setup
    m1, m2, m3 = await store(db, channel_id, alice.id, 3)
    assert (m1.prev_id, m2.prev_id, m3.prev_id) == (0, m1.id, m2.id)
    feeds.on_message(event(m3))  # ahead of a gap: held
    assert sink.batches == []
    feeds.on_message(event(m1))
    feeds.on_message(event(m2))  # fills the gap and lets 3 through
    assert sink.ids(channel_id) == [m1.id, m2.id, m3.id]
    feeds.on_message(event(m2))  # a duplicate
    assert sink.ids(channel_id) == [m1.id, m2.id, m3.id]


async def test_a_lost_event_is_filled_from_postgresql(setup):
    feeds, sink, channel_id, db, alice = setup
    m1, m2, m3 = await store(db, channel_id, alice.id, 3)
    feeds.on_message(event(m1))
    feeds.on_message(event(m3))  # m2's event never came
    assert sink.ids(channel_id) == [m1.id]
    assert channel_id in feeds._dirty  # the gap asks for a fill at once
    await feeds.sync([channel_id])
    assert sink.ids(channel_id) == [m1.id, m2.id, m3.id]
    assert feeds.feeds[channel_id].held == {}


async def test_a_lost_last_message_is_found_by_the_reconcile(setup):
    feeds, sink, channel_id, db, alice = setup
    m1, m2 = await store(db, channel_id, alice.id, 2)
    feeds.on_message(event(m1))  # m2's publisher died after its commit
    await feeds.sync([channel_id])
    assert sink.ids(channel_id) == [m1.id, m2.id]
    # The watermark: everything of the channel up to it is written; later ids are larger.
    assert feeds.watermark >= m2.id
    (m3,) = await store(db, channel_id, alice.id, 1)
    assert m3.id > feeds.watermark


async def test_too_many_missed_resets_the_channel(setup, monkeypatch):
    feeds, sink, channel_id, db, alice = setup
    monkeypatch.setattr(feeds_module, "FILL_MAX", 3)
    stored = await store(db, channel_id, alice.id, 5)
    await feeds.sync([channel_id])
    assert sink.resets == [(channel_id, stored[-1].id)] and sink.batches == []
    (later,) = await store(db, channel_id, alice.id, 1)
    feeds.on_message(event(later))  # in sequence after the reset's head
    assert sink.ids(channel_id) == [later.id]


async def test_the_running_loop_catches_up_within_the_interval(setup):
    feeds, sink, channel_id, db, alice = setup
    feeds.interval = 0.05
    feeds.start()
    try:
        m1, m2 = await store(db, channel_id, alice.id, 2)  # no events at all
        deadline = time.monotonic() + 2
        while sink.ids(channel_id) != [m1.id, m2.id]:
            assert time.monotonic() < deadline, sink.batches
            await asyncio.sleep(0.01)
    finally:
        await feeds.stop()


async def test_racing_posts_from_two_services_stay_one_chain(client, alice):
    """Posts into one channel from two connections at once: the chain has no fork."""
    channel_id = await make_channel(client, alice)
    messages = client.app[MESSAGES]
    user = alice.user
    await asyncio.gather(*(messages.post(user, channel_id, f"r{i}") for i in range(40)))
    rows = await messages.db.fetch(
        "SELECT id, prev_id FROM messages WHERE channel_id = %s ORDER BY id", (channel_id,)
    )
    assert [r["prev_id"] for r in rows] == [0] + [r["id"] for r in rows[:-1]]


async def test_released_feeds_are_forgotten(setup):
    feeds, sink, channel_id, db, alice = setup
    feeds.acquire(channel_id)  # a second stream on the channel
    feeds.release(channel_id)
    assert channel_id in feeds.feeds
    feeds.release(channel_id)
    assert channel_id not in feeds.feeds
    (m,) = await store(db, channel_id, alice.id, 1)
    feeds.on_message(event(m))  # nobody follows it here: ignored
    assert sink.batches == []


def test_reconcile_interval_bounds(client):
    base = client.app[SETTINGS]
    assert reconcile_interval(base) == 1.0
    assert reconcile_interval(replace(base, sse_catchup_s=1.0)) == pytest.approx(0.2)
    assert reconcile_interval(replace(base, sse_catchup_s=0.1)) == 0.05


async def test_visible_ids_and_memberships(client, alice, bob):
    channels = client.app[CHANNELS]
    public = await make_channel(client, alice, "pub")
    private = await make_channel(client, alice, "priv", private=True)
    assert await channels.visible_ids(bob.user, [public, private, 999_999]) == {public}
    assert await channels.visible_ids(alice.user, [public, private]) == {public, private}
    assert await channels.member_ids(alice.user) == sorted([public, private])
    assert await channels.member_ids(bob.user) == []


async def test_after_the_bus_was_lost_nothing_is_written_before_access_is_rechecked(setup):
    feeds, sink, channel_id, db, alice = setup
    checks: list[int] = []

    async def access_check() -> None:
        checks.append(len(sink.batches))  # what had been written when it ran

    feeds.access_check = access_check
    (m1,) = await store(db, channel_id, alice.id, 1)
    feeds.bus_lost()
    feeds.bus_back()
    feeds.on_message(event(m1))  # in sequence, but a removal may have been lost: held
    assert sink.batches == []
    await feeds.sync([channel_id])
    assert checks == [0] and sink.ids(channel_id) == [m1.id]
    (m2,) = await store(db, channel_id, alice.id, 1)
    feeds.on_message(event(m2))  # checked: live again
    assert sink.ids(channel_id) == [m1.id, m2.id]


async def test_access_recheck_drops_what_a_lost_removal_should_have(client, alice, bob):
    """A removal whose bus event never came (done in SQL here, as a lost event leaves
    it): the re-check closes the per-channel stream and unsubscribes the multi one."""
    from server.keys import STREAMS
    from tests.helpers import API
    from tests.sse_helpers import SSEReader

    private = await make_channel(client, alice, "club", private=True)
    public = await make_channel(client, alice, "open")
    for c in (private, public):
        resp = await client.post(
            f"{API}/channels/{c}/members", json={"user_id": bob.id}, headers=alice.headers
        )
        assert resp.status == 204
    one = await client.get(f"{API}/channels/{private}/events", headers=bob.headers)
    members = await client.get(f"{API}/events", headers=bob.headers)
    readers = [SSEReader(one.content), SSEReader(members.content)]
    for r in readers:
        await r.until("ready")
    await client.app[MESSAGES].db.execute(
        "DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s", (private, bob.id)
    )
    await client.app[STREAMS].recheck_access()
    closed = await readers[0].until("close")
    assert closed.data["reason"] == "revoked"
    gone = await readers[1].until("unsubscribed")
    assert gone.data == {"channel_id": private, "reason": "revoked"}
    (stream,) = [s for s in client.app[STREAMS].streams.values() if s.kind == 2]
    assert stream.channels == (public,)
    one.close()
    members.close()


async def test_heads_wait_for_a_post_in_flight_and_cover_it(client, alice):
    """One statement (herald_channel_heads) still takes the posting locks before it
    reads the sequence and the heads: a post holding its lock is waited for, and the
    heads returned include it, so the watermark never passes an uncommitted id."""
    messages = client.app[MESSAGES]
    db = messages.db
    a = await make_channel(client, alice, "heads-a")
    b = await make_channel(client, alice, "heads-b")
    (first,) = await store(db, a, alice.id, 1)
    watermark, heads = await messages.heads([])
    assert heads == {} and watermark == (await messages.heads([a]))[0] >= first.id
    async with db.transaction() as tx:
        in_flight = await insert_message(tx, b, alice.id, "not yet committed")
        reading = asyncio.create_task(messages.heads([b, a, b]))
        deadline = time.monotonic() + 10
        while not await db.fetchval(  # the read waits on the post's lock
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%%herald_channel_heads%%'"
        ):
            assert time.monotonic() < deadline and not reading.done()
            await asyncio.sleep(0.01)
        assert not reading.done()
    watermark, heads = await asyncio.wait_for(reading, 10)
    assert heads == {a: first.id, b: in_flight.id}
    assert watermark >= in_flight.id
