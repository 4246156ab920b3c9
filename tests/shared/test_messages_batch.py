"""insert_messages: the batch insert used by delayed delivery."""

import asyncio

from shared.services.messages import insert_messages


async def _seed(db):
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO users (name) VALUES ('a'), ('b')")
        await tx.execute("INSERT INTO channels (name, created_by) VALUES ('one', 1), ('two', 1)")
        await tx.execute(
            "INSERT INTO channel_members (channel_id, user_id) VALUES (1, 1), (2, 1), (1, 2)"
        )


async def test_ids_follow_the_given_order_and_read_markers_move(db):
    await _seed(db)
    items = [(1, 1, "first"), (1, 2, "second"), (1, 1, "third"), (2, 1, "other ' ; --")]
    async with db.transaction() as tx:
        posted = [p.message for p in await insert_messages(tx, items)]
    assert [(m["channel_id"], m["author"]["id"], m["body"]) for m in posted] == items
    ids = [m["id"] for m in posted]
    assert ids == sorted(ids)
    markers = {
        (r["channel_id"], r["user_id"]): r["last_read_message_id"]
        for r in await db.fetch("SELECT * FROM channel_members")
    }
    assert markers == {(1, 1): ids[2], (1, 2): ids[1], (2, 1): ids[3]}


async def test_empty_batch_does_nothing(db):
    async with db.transaction() as tx:
        assert await insert_messages(tx, []) == []


async def test_two_batches_over_the_same_channels_never_deadlock(db):
    await _seed(db)

    async def batch(order):
        async with db.transaction() as tx:
            return await insert_messages(tx, [(c, 1, f"m{c}") for c in order])

    # Channel locks are taken in channel order whatever the batch order, so opposite
    # orders serialise instead of deadlocking.
    results = await asyncio.gather(*(batch([1, 2] if i % 2 else [2, 1]) for i in range(10)))
    assert sum(len(r) for r in results) == 20
    assert await db.fetchval("SELECT count(*) FROM messages") == 20
