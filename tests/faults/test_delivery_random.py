"""A seeded, bounded random interleaving: 20 channels, posts through two real server
processes, multi-channel streams (chosen lists and membership streams) that drop at
random points and resume, on either server, with the last ``id:`` they saw (the
browser's rule). What each stream received, over all its connections, is exactly what
PostgreSQL committed to its channels: no gap, no duplicate, per-channel id order.

``HERALD_TEST_SEED=N`` runs one more seed (a failure prints the seed that found it).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import aiohttp
import pytest

from shared.services.users import UserService
from tests.faults.delivery_procs import (
    CATCHUP_S,
    MARGIN_S,
    Load,
    Watch,
    assert_exact,
    cluster,
    committed,
    figures,
    make_channels,
    run_load,
    settle,
)
from tests.helpers import API

CHANNELS = 20
STREAMS = 8
RUN_S = 4.0
SEEDS = [1, 2] + ([int(os.environ["HERALD_TEST_SEED"])] if "HERALD_TEST_SEED" in os.environ else [])


@pytest.mark.parametrize("seed", SEEDS)
async def test_streams_dropping_and_resuming_at_random_get_everything_once(
    database_url, db, tmp_path, seed
):
    rng = random.Random(seed)
    _, token = await UserService(db=db).create("alice")
    async with cluster(database_url, tmp_path) as procs:
        servers = [await procs.serve(), await procs.serve()]
        bases = [s.url for s in servers]
        async with aiohttp.ClientSession() as session:
            channels = await make_channels(session, bases[0], token, CHANNELS)
            watches: list[tuple[Watch, list[int]]] = []
            for k in range(STREAMS):
                if k < 2:  # membership streams: every channel
                    chosen, query = channels, ""
                else:
                    chosen = sorted(rng.sample(channels, rng.randint(2, 10)))
                    query = "?channels=" + ",".join(map(str, chosen))
                url = f"{API}/events{query}"
                watches.append((Watch(session, rng.choice(bases) + url, token, f"w{k}"), chosen))
            for w, _ in watches:
                await w.open()
            paths = {id(w): w.url.split(API, 1)[1] for w, _ in watches}
            load, stop = Load(), asyncio.Event()
            loader = asyncio.create_task(
                run_load(session, bases, token, channels, load, stop, rng, rate=30.0)
            )
            drops = 0
            try:
                end = time.monotonic() + RUN_S
                while time.monotonic() < end:
                    # The random schedule of the clients' drops (the workload, not a wait).
                    await asyncio.sleep(rng.uniform(0.05, 0.4))
                    w, _ = rng.choice(watches)
                    await w.drop()
                    drops += 1
                    if rng.random() < 0.5:
                        await asyncio.sleep(rng.uniform(0.0, 0.5))  # away for a while
                    w.url = rng.choice(bases) + API + paths[id(w)]
                    await w.open(resume=True)
            finally:
                stop.set()
                await loader
            truth = await committed(db, channels)
            await settle(watches, truth, max(load.answered.values()) + CATCHUP_S + MARGIN_S)
            for w, _ in watches:
                await w.drop()
    fig = figures(watches, truth, load, CATCHUP_S + MARGIN_S)
    print(f"\nseed {seed}: {drops} drops and resumes; {fig.line()}; answers {load.statuses}")
    for w, cs in watches:
        assert_exact(w, truth, cs)
    assert fig.duplicated == 0, (seed, fig.line())
    assert load.statuses == {"201": len(load.answered)}
