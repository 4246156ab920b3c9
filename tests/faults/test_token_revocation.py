"""A revoked token is refused (401) by every server process within 2 s, and its open
streams get ``close`` ``revoked``: two real ``herald serve`` processes on an own
redis-server, the token cached on both, streams of it open on both. Three ways:

* ``herald tokens revoke`` with Redis up (the cache delete and the bus event work);
* revoked in PostgreSQL only, Redis up: the delete and the event are lost, and the
  servers' once-a-second sweep must find it (the stale cache entry is the trap);
* ``herald tokens revoke`` with Redis stopped: the command still revokes, and the
  servers refuse it from PostgreSQL.

Times are measured from the token's ``revoked_at`` (PostgreSQL's clock, this machine's),
so the command's own start and exit do not count in its favour.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp

from shared.services.users import UserService
from tests.faults.delivery_procs import Cluster, Watch, cluster
from tests.helpers import API, wait_for

BOUND_S = 2.0


async def status(session: aiohttp.ClientSession, base: str, token: str) -> int:
    async with session.get(
        f"{base}{API}/me",
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=10),
    ) as resp:
        await resp.read()
        return resp.status


async def refused_at(session: aiohttp.ClientSession, base: str, token: str) -> float:
    """Poll until the server answers 401; the wall time it first did."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if await status(session, base, token) == 401:
            return time.time()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{base} still accepts the revoked token after 10 s")


async def closed_at(watch: Watch) -> float:
    """Wait until the stream got ``close`` and ended; the wall time close was seen."""
    await wait_for(lambda: any(e == "close" for e, _ in watch.events), 10, f"{watch.name} close")
    seen = time.time()
    closes = [d for e, d in watch.events if e == "close"]
    assert closes == [closes[0]] and closes[0]["reason"] == "revoked", watch.events
    async with asyncio.timeout(5):
        await watch.ended.wait()
    return seen


async def revoked_at(db: Any, token_id: int) -> float:
    value = await db.fetchval(
        "SELECT extract(epoch FROM revoked_at)::float8 FROM api_tokens WHERE id = %s",
        (token_id,),
    )
    assert value is not None
    return float(value)


async def cli_revoke(procs: Cluster, token_id: int) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "herald", "tokens", "revoke", str(token_id),
        env=procs.env(), cwd=procs.workdir,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, (out, err)
    assert err == b"", err
    return out.decode()


async def test_revoked_token_refused_everywhere_within_2s(database_url, db, tmp_path):
    users = UserService(db=db)
    alice, keep = await users.create("alice")
    tokens = {}
    for how in ("cli", "sql", "redis_down"):
        info, token = await users.create_token(alice, label=how)
        tokens[how] = (info.id, token)
    async with cluster(database_url, tmp_path) as procs:
        servers = [await procs.serve(), await procs.serve()]
        bases = [s.url for s in servers]
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{bases[0]}{API}/channels",
                json={"name": "watched"},
                headers={"Authorization": f"Bearer {keep}"},
            ) as resp:
                assert resp.status == 201
                channel_id = int((await resp.json())["id"])
            watches: dict[str, list[Watch]] = {}
            for how, (_, token) in tokens.items():
                # Cached on both servers (the entry a lost delete would leave behind).
                for base in bases:
                    assert await status(session, base, token) == 200
                watches[how] = [
                    Watch(session, f"{bases[0]}{API}/channels/{channel_id}/events", token,
                          f"{how}-a-one"),
                    Watch(session, f"{bases[1]}{API}/events", token, f"{how}-b-many"),
                ]  # fmt: skip
                for w in watches[how]:
                    await w.open()
            kept = Watch(session, f"{bases[1]}{API}/channels/{channel_id}/events", keep, "keep")
            await kept.open()
            report = []

            async def check(how: str) -> None:
                token_id, token = tokens[how]
                at = await revoked_at(db, token_id)
                refused = await asyncio.gather(*(refused_at(session, b, token) for b in bases))
                closed = await asyncio.gather(*(closed_at(w) for w in watches[how]))
                lags = [round(t - at, 3) for t in (*refused, *closed)]
                report.append(f"{how}: 401 on A, B and close on A, B after {lags} s")
                assert max(lags) < BOUND_S, (how, lags)
                for base in bases:  # the user's other token still works everywhere
                    assert await status(session, base, keep) == 200

            # 1. The command, Redis up.
            out = await cli_revoke(procs, tokens["cli"][0])
            assert out == f"revoked: token {tokens['cli'][0]}\n"
            await check("cli")
            # 2. PostgreSQL only: no cache delete, no bus event; the entries are cached.
            await db.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE id = %s", (tokens["sql"][0],)
            )
            await check("sql")
            # 3. The command with Redis stopped.
            await procs.redis.stop()
            out = await cli_revoke(procs, tokens["redis_down"][0])
            assert out.startswith(f"revoked: token {tokens['redis_down'][0]}\n")
            assert "Redis unreachable" in out
            await check("redis_down")
            assert not kept.ended.is_set() and not [e for e, _ in kept.events if e == "close"]
            print("\n" + "\n".join(report))
            for w in [*(w for ws in watches.values() for w in ws), kept]:
                await w.drop()
        for server in servers:
            assert server.proc.poll() is None, server.text()
            assert "Traceback" not in server.text()
