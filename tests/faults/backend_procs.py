"""An own, throwaway PostgreSQL cluster for tests that stop or freeze the database (the
machine's shared server is never touched), and small timing helpers for the outage
tests. Redis and the herald processes come from tests/faults/delivery_procs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2

from tests.faults.delivery_procs import ROOT, free_port
from tests.helpers import wait_for


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"no PostgreSQL {name} on this machine")
    return found[-1]


class PgCluster:
    """initdb + pg_ctl as the ``postgres`` user (they refuse root), fsync off, TCP on
    127.0.0.1 only; ``freeze()`` stops every process of the cluster (SIGSTOP), so
    established connections and new ones alike get no answer."""

    def __init__(self) -> None:
        self.port = free_port(26000, 28000)
        self.dir = Path(tempfile.mkdtemp(prefix="herald-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.log = self.dir / "pg.log"

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], capture_output=True, timeout=60
        )

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def init(self) -> None:
        done = self._as_postgres(
            _pg_bin("initdb"), "-D", str(self.data), "--no-sync", "-A", "trust", "-U", "postgres"
        )
        assert done.returncode == 0, done.stderr.decode()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "start"
        )
        assert done.returncode == 0, done.stderr.decode() + self.log.read_text()

    def stop(self) -> None:
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _pids(self) -> list[int]:
        pidfile = self.data / "postmaster.pid"
        main = int(pidfile.read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True)
        return [main, *(int(p) for p in children.stdout.split())]

    def freeze(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def create_database(self, name: str) -> str:
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.dsn(name)

    def connections(self, dbname: str) -> int:
        """Client backends connected to ``dbname`` (this query's own excepted)."""
        conn = psycopg2.connect(self.dsn())
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                    " AND pid <> pg_backend_pid()",
                    (dbname,),
                )
                row = cur.fetchone()
                return int(row[0]) if row else 0
        finally:
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.thaw()
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def pg_cluster() -> AsyncIterator[PgCluster]:
    pg = PgCluster()
    try:
        await asyncio.to_thread(pg.init)
        await asyncio.to_thread(pg.start)
        yield pg
    finally:
        await asyncio.to_thread(pg.close)


def herald_cli(env: dict[str, str], *args: str) -> str:
    """Run ``python -m herald ARGS`` with ``env``; its stdout (asserting exit 0)."""
    done = subprocess.run(
        [sys.executable, "-m", "herald", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def token_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("token:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(output)


@dataclass
class Answer:
    status: int
    seconds: float
    body: Any
    headers: dict[str, str]


async def timed(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    """One request and how long its answer took (a client timeout far above the bound)."""
    start = time.monotonic()
    async with session.request(
        method, url, timeout=aiohttp.ClientTimeout(total=30), **kwargs
    ) as resp:
        try:
            body: Any = await resp.json()
        except (aiohttp.ContentTypeError, ValueError):
            body = await resp.text()
        return Answer(resp.status, time.monotonic() - start, body, dict(resp.headers))


async def until_status(
    session: aiohttp.ClientSession, method: str, url: str, status: int, within_s: float,
    **kwargs: Any,
) -> Answer:  # fmt: skip
    """Poll until ``url`` answers ``status`` (recovery after a fault)."""
    last: list[Answer] = []

    async def ok() -> bool:
        last[:] = [await timed(session, method, url, **kwargs)]
        return last[0].status == status

    await wait_for(ok, within_s, f"{method} {url} → {status}", interval=0.2)
    return last[0]
