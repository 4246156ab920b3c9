"""Joins while messages flow: a user's membership streams on two real servers, posts
into the channels through both, and the user added to them one by one (through either
server) mid-load. On every stream each joined channel's messages are a gap-free,
duplicate-free, ordered run of what PostgreSQL holds, from the join to the newest."""

from __future__ import annotations

import asyncio
import random

import aiohttp

from shared.services.users import UserService
from tests.faults.delivery_procs import (
    CATCHUP_S,
    MARGIN_S,
    Load,
    Watch,
    cluster,
    committed,
    post_one,
    run_load,
)
from tests.helpers import API, wait_for

CHANNELS = 6


async def test_channels_joined_under_load_arrive_whole(database_url, db, tmp_path):
    users = UserService(db=db)
    _, alice = await users.create("alice")
    bob_user, bob = await users.create("bob")
    rng = random.Random(5)
    async with cluster(database_url, tmp_path) as procs:
        servers = [await procs.serve(), await procs.serve()]
        bases = [s.url for s in servers]
        async with aiohttp.ClientSession() as session:
            channels = []
            for i in range(CHANNELS):
                async with session.post(
                    f"{bases[0]}{API}/channels",
                    json={"name": f"club-{i}", "is_private": True},
                    headers={"Authorization": f"Bearer {alice}"},
                ) as resp:
                    assert resp.status == 201
                    channels.append(int((await resp.json())["id"]))
            watches = [
                Watch(session, f"{b}{API}/events", bob, f"bob@{i}") for i, b in enumerate(bases)
            ]
            for w in watches:
                await w.open()
            load, stop = Load(), asyncio.Event()
            loader = asyncio.create_task(
                run_load(session, bases, alice, channels, load, stop, rng, rate=30.0)
            )
            after_join: dict[int, int] = {}
            try:
                for i, c in enumerate(channels):
                    await asyncio.sleep(rng.uniform(0.1, 0.4))  # the joins' schedule
                    async with session.post(
                        f"{bases[i % 2]}{API}/channels/{c}/members",
                        json={"user_id": bob_user.id},
                        headers={"Authorization": f"Bearer {alice}"},
                    ) as resp:
                        assert resp.status == 204, await resp.text()
                    # Everything after this id was committed after the join.
                    after_join[c] = int(
                        await db.fetchval(
                            "SELECT COALESCE(max(id), 0) FROM messages WHERE channel_id = %s", (c,)
                        )
                    )
                await asyncio.sleep(0.5)  # load goes on after the last join
            finally:
                stop.set()
                await loader
            for i, c in enumerate(channels):  # and one more in each, after every join
                await post_one(session, bases[i % 2], alice, c, "after the joins", load)
            truth = await committed(db, channels)

            def complete() -> bool:
                return all(
                    set(w.of(c)) >= {m for m in truth[c] if m > after_join[c]}
                    for w in watches
                    for c in channels
                )

            await wait_for(complete, CATCHUP_S + MARGIN_S, "every joined channel", interval=0.05)
            for w in watches:
                await w.drop()
    for w in watches:
        subscribed = [d["channel_id"] for e, d in w.events if e == "subscribed"]
        assert sorted(subscribed) == channels, (w.name, w.events)
        assert not w.resets(), w.name
        for c in channels:
            got = w.of(c)
            assert got, (w.name, c)
            start = truth[c].index(got[0])
            # A gap-free run of the channel, from where the stream joined to its newest.
            assert got == truth[c][start:], (w.name, c, got[:5], truth[c][start : start + 5])
            assert got[0] <= min((m for m in truth[c] if m > after_join[c]), default=got[0])
    print(
        f"\njoins: {CHANNELS} joins under {len(load.answered)} posts;"
        f" {sum(len(w.got) for w in watches)} deliveries to {len(watches)} streams"
    )
    assert load.statuses == {"201": len(load.answered)}
