"""Idle CPU alone: Nchan and Herald holding N streams (heartbeat 15 s), interleaved.

    .venv/bin/python -m bench.idle                 # 10,000 streams, 2 runs, ~4 min
    .venv/bin/python -m bench.idle --py-spy FILE   # also profile Herald's first window

The bench.peers idle row without the rest of that bench: the same two client processes,
the same /proc CPU figure (user and system, the server's whole process tree), so a
change to the idle path can be measured in minutes. Prints each run and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from typing import Any

from bench.peers import (
    NchanTarget,
    Pair,
    ensure_nchan,
    herald_channels,
    herald_env,
    py_spy_start,
    py_spy_stop,
    ready_marker,
    tree_cpu_s,
)
from bench.sse import HeraldTarget, drop_db, free_port, setup_db


async def idle_cpu(target: Any, pair: Pair, args: argparse.Namespace, spy: str | None) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await target.wait_up(session)
        if isinstance(target, HeraldTarget):
            (target.channel_id,) = await herald_channels(session, target, 1)
        await pair.open(args.streams, target.port, target.request(), ready_marker(target))
        await asyncio.sleep(5)  # the opening burst's work done
        cpu0 = tree_cpu_s(target.pid)
        await asyncio.sleep(args.window)
        pct = (tree_cpu_s(target.pid) - cpu0) / args.window * 100
        if spy:
            proc = py_spy_start(target, spy)
            await asyncio.sleep(args.window)
            py_spy_stop(proc, spy)
        await pair.close()
    return pct


async def driver(args: argparse.Namespace) -> None:
    skip = ensure_nchan(not args.no_install)
    peers = ["herald"] if skip else ["nchan", "herald"]
    if skip:
        print(f"== nchan: skipped: {skip}", flush=True)
    db_name = f"herald_idle_{os.getpid()}"
    url, token = await setup_db(db_name)
    env = herald_env(url, 15.0)
    runs: dict[str, list[float]] = {p: [] for p in peers}
    pair = Pair()
    try:
        for run in range(args.runs):
            for name in peers:
                if name == "nchan":
                    target: Any = NchanTarget(0, 15)
                else:
                    target = HeraldTarget(0, env)
                    target.token = token
                target.port = free_port()
                target.start()
                try:
                    spy = args.py_spy if name == "herald" and run == 0 else None
                    runs[name].append(await idle_cpu(target, pair, args, spy))
                finally:
                    target.stop()
                print(f"== run {run + 1}: {name} {runs[name][-1]:.2f} % CPU", flush=True)
    finally:
        pair.stop()
        drop_db(db_name)
    for name, values in runs.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name}: median {statistics.median(values):.2f} % ({each})")
    if len(peers) == 2:
        ratios = [h / n for h, n in zip(runs["herald"], runs["nchan"], strict=True)]
        print("herald / nchan per run: " + ", ".join(f"{r:.2f}x" for r in ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=10000)
    parser.add_argument("--window", type=float, default=20.0, help="seconds per figure")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-install", action="store_true", help="never apt-get nginx")
    parser.add_argument("--py-spy", metavar="FILE", help="profile Herald's first run")
    asyncio.run(driver(parser.parse_args()))


if __name__ == "__main__":
    main()
