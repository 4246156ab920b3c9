"""Posts into one channel racing through two real server processes: every stream, of
either kind and on either server, sees strictly increasing ids with none missing."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp

from shared.services.users import UserService
from tests.faults.delivery_procs import (
    CATCHUP_S,
    MARGIN_S,
    Load,
    Watch,
    assert_exact,
    cluster,
    committed,
    make_channels,
    post_one,
    settle,
)
from tests.helpers import API

POSTERS_PER_SERVER = 8
POSTS_EACH = 20


async def test_racing_posters_through_two_processes(database_url, db, tmp_path):
    _, token = await UserService(db=db).create("alice")
    async with cluster(database_url, tmp_path) as procs:
        servers = [await procs.serve(), await procs.serve()]
        async with aiohttp.ClientSession() as session:
            (channel,) = await make_channels(session, servers[0].url, token, 1)
            watches: list[Watch] = []
            for s, server in enumerate(servers):
                for url in (
                    f"{server.url}{API}/channels/{channel}/events",
                    f"{server.url}{API}/channels/{channel}/events",
                    f"{server.url}{API}/events?channels={channel}",
                    f"{server.url}{API}/events",
                ):
                    watches.append(Watch(session, url, token, f"s{s}:{url[-20:]}"))
            for w in watches:
                await w.open()
            load = Load()

            async def poster(base: str, k: int) -> None:
                for i in range(POSTS_EACH):
                    await post_one(session, base, token, channel, f"{k}/{i}", load)

            await asyncio.gather(
                *(poster(server.url, k) for server in servers for k in range(POSTERS_PER_SERVER))
            )
            truth = await committed(db, [channel])
            await settle(
                [(w, [channel]) for w in watches], truth, time.monotonic() + CATCHUP_S + MARGIN_S
            )
            for w in watches:
                await w.drop()
    total = len(servers) * POSTERS_PER_SERVER * POSTS_EACH
    assert load.statuses == {"201": total}
    assert len(truth[channel]) == total
    for w in watches:
        ids = w.of(channel)
        assert all(a < b for a, b in itertools.pairwise(ids)), w.name
        assert_exact(w, truth, [channel])
    print(
        f"\nracing: {total} posts by {2 * POSTERS_PER_SERVER} posters, {len(watches)} streams exact"
    )
