"""A publisher that dies between its commit and its publish (the contract's "Delivery
guarantees" 2): rows a killed publisher leaves (committed with the right prev_id, no
bus event), a ``herald serve`` SIGKILLed under load, and ``herald worker`` SIGKILLed in
mid-delivery of a 300-message due batch. Every open stream ends with every committed
message of its channels exactly once, in order, within the catch-up bound."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import aiohttp
import redis.asyncio as aioredis

from shared.constants import AdvisoryLock, events_channel
from shared.services.users import UserService
from tests.faults.delivery_procs import (
    CATCHUP_S,
    MARGIN_S,
    Load,
    assert_exact,
    cluster,
    committed,
    figures,
    make_channels,
    open_streams,
    post_one,
    run_load,
    settle,
)
from tests.helpers import wait_for

BOUND_S = CATCHUP_S + MARGIN_S


async def orphan_row(db, channel_id: int, author_id: int, body: str) -> int:
    """What a publisher killed after its commit leaves: a row, no bus event."""
    async with db.transaction() as tx:
        await tx.execute(
            "SELECT pg_advisory_xact_lock(%s, %s)", (AdvisoryLock.CHANNEL_POST, channel_id)
        )
        return int(
            await tx.fetchval(
                "INSERT INTO messages (channel_id, author_id, body, prev_id) VALUES (%s, %s, %s,"
                " (SELECT COALESCE(max(id), 0) FROM messages WHERE channel_id = %s)) RETURNING id",
                (channel_id, author_id, body, channel_id),
            )
        )


async def test_committed_but_never_published_rows_reach_every_stream(database_url, db, tmp_path):
    user, token = await UserService(db=db).create("alice")
    async with cluster(database_url, tmp_path) as procs:
        servers = [await procs.serve(), await procs.serve()]
        bases = [s.url for s in servers]
        async with aiohttp.ClientSession() as session:
            channels = await make_channels(session, bases[0], token, 4)
            watches = await open_streams(session, bases, token, channels)
            load = Load()
            # 1. A lost last message: only the reconcile can find it.
            for c in channels:
                load.answered[await orphan_row(db, c, user.id, "lost last")] = time.monotonic()
            truth = await committed(db, channels)
            await settle(watches, truth, time.monotonic() + BOUND_S)
            fig_last = figures(watches, truth, load, BOUND_S)
            # 2. A lost message in the middle: the next event shows the gap at once.
            for c in channels:
                load.answered[await orphan_row(db, c, user.id, "lost middle")] = time.monotonic()
                await post_one(session, bases[c % 2], token, c, "after the gap", load)
            # 3. Several lost in a row, then live ones again.
            for i in range(5):
                c = channels[i % len(channels)]
                load.answered[await orphan_row(db, c, user.id, f"lost {i}")] = time.monotonic()
            for c in channels:
                await post_one(session, bases[0], token, c, "live again", load)
            truth = await committed(db, channels)
            await settle(watches, truth, time.monotonic() + BOUND_S)
            for w, _ in watches:
                await w.drop()
    fig = figures(watches, truth, load, BOUND_S)
    print(f"\nlost last: {fig_last.line()}\nall: {fig.line()}")
    for w, cs in watches:
        assert_exact(w, truth, cs)
    assert fig_last.late == 0 and fig.late == 0 and fig.duplicated == 0, fig.line()
    assert load.statuses == {"201": 2 * len(channels)}


async def test_a_server_sigkilled_under_load_loses_nothing_on_the_other(database_url, db, tmp_path):
    _, token = await UserService(db=db).create("alice")
    async with cluster(database_url, tmp_path) as procs:
        doomed, survivor = await procs.serve(), await procs.serve()
        await procs.worker()
        async with aiohttp.ClientSession() as session:
            channels = await make_channels(session, survivor.url, token, 6)
            # Streams on the survivor only are checked; the doomed one's die with it.
            watches = await open_streams(session, [survivor.url], token, channels)
            await open_streams(session, [doomed.url], token, channels)
            load, stop = Load(), asyncio.Event()
            loader = asyncio.create_task(
                run_load(
                    session, [doomed.url, survivor.url], token, channels, load, stop,
                    random.Random(7), rate=40.0,
                )
            )  # fmt: skip
            try:
                # Kill once posts through the doomed server are flowing.
                await wait_for(lambda: len(load.answered) >= 40, 20, "load", interval=0.05)
                # Pause Redis writes: posts now commit and hang in their publish, so the kill
                # lands between commit and publish for those on the doomed server.
                procs.redis.pause_writes(20)

                async def stuck() -> bool:
                    stored = await db.fetchval(
                        "SELECT count(*) FROM messages WHERE channel_id = ANY(%s)", (channels,)
                    )
                    return stored - len(load.answered) >= 6

                await wait_for(stuck, 20, "posts committed and waiting to publish")
                doomed.kill()
                procs.redis.unpause()
                killed_at = time.monotonic()
                await wait_for(lambda: len(load.answered) >= 80, 20, "load after", interval=0.05)
            finally:
                stop.set()
                await loader
            truth = await committed(db, channels)
            await settle(watches, truth, max(load.answered.values()) + BOUND_S)
            for w, _ in watches:
                await w.drop()
    fig = figures(watches, truth, load, BOUND_S, killed_at)
    stored = {m for v in truth.values() for m in v}
    print(
        f"\nserve SIGKILL: {fig.line()}; answers {load.statuses};"
        f" committed {len(stored)} of which unanswered {len(stored - set(load.answered))}"
    )
    for w, cs in watches:
        assert_exact(w, truth, cs)
    assert set(load.answered) <= stored
    assert fig.late == 0 and fig.duplicated == 0, fig.line()
    assert any(k != "201" for k in load.statuses), load.statuses  # the kill did hit posts
    assert stored - set(load.answered), "no post was killed between commit and publish"


async def test_worker_sigkilled_mid_delivery_of_300_due(database_url, db, tmp_path):
    user, token = await UserService(db=db).create("alice")
    async with cluster(database_url, tmp_path) as procs:
        servers = [await procs.serve(), await procs.serve()]
        bases = [s.url for s in servers]
        bus = aioredis.Redis.from_url(procs.redis.url)
        carried: list[bytes] = []
        async with aiohttp.ClientSession() as session:
            channels = await make_channels(session, bases[0], token, 3)
            watches = await open_streams(session, bases, token, channels)
            pubsub = bus.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(events_channel(0))

            async def listen() -> None:
                with contextlib.suppress(aioredis.ConnectionError):
                    async for raw in pubsub.listen():
                        if b'"type":"message"' in raw["data"]:
                            carried.append(raw["data"])

            listener = asyncio.create_task(listen())
            worker = await procs.worker()
            await db.execute(
                "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at)"
                " SELECT (%s::bigint[])[1 + n %% 3], %s, 'due ' || n,"
                "  now() + interval '1.5 seconds' FROM generate_series(0, 299) AS n",
                (channels, user.id),
            )

            async def delivering() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT count(*) FROM delayed_messages WHERE status = 'delivered'"
                    )
                )

            await wait_for(delivering, 30, "the first delivered batch", interval=0.005)
            # Freeze the bus at once: the worker's publishes after its commit now hang,
            # and the kill lands between commit and publish for whatever is left.
            procs.redis.freeze()
            worker.kill()
            at_kill = await db.fetchval(
                "SELECT count(*) FROM delayed_messages WHERE status = 'delivered'"
            )
            procs.redis.thaw()
            await procs.worker()  # the next one delivers the rest

            async def all_delivered() -> bool:
                return not await db.fetchval(
                    "SELECT count(*) FROM delayed_messages WHERE status = 'pending'"
                )

            await wait_for(all_delivered, 30, "the rest to be delivered", interval=0.05)
            done_at = time.monotonic()
            truth = await committed(db, channels)
            await settle(watches, truth, done_at + BOUND_S)
            caught_up = max(g.at for w, _ in watches for g in w.got) - done_at
            for w, _ in watches:
                await w.drop()
            listener.cancel()
            await pubsub.aclose()
        await bus.aclose()
    total = sum(len(v) for v in truth.values())
    deliveries = sum(len(w.got) for w, _ in watches)
    print(
        f"\nworker SIGKILL: 300 due, {at_kill} delivered at the kill, {total} committed,"
        f" {len(carried)} carried by the bus, {deliveries} deliveries to {len(watches)} streams,"
        f" last arrival {caught_up:.2f}s after the last commit"
    )
    assert total == 300
    assert await db.fetchval("SELECT count(DISTINCT message_id) FROM delayed_messages") == 300
    for w, cs in watches:
        assert_exact(w, truth, cs)
    assert caught_up <= BOUND_S
