"""PostgreSQL access through aiopg: the pool, a transaction helper, dict rows, timing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiopg
import psycopg2
import psycopg2.extensions

from shared.db.monitor import QueryMonitor

logger = logging.getLogger(__name__)

Row = dict[str, Any]


async def usable_host(dsn: str) -> str:
    """``dsn`` pinned to the first of its servers libpq can use, when it names several
    (``postgresql://a:5432,b:5432/herald?target_session_attrs=read-write``).

    aiopg watches the socket libpq opened first; when libpq gives up on one host and
    opens a socket to the next, aiopg never sees it and the connect hangs until its
    timeout. So a blocking libpq connect (in a thread) picks the server, honouring
    ``target_session_attrs``, and the pool connects to that one only, until the process
    restarts (docs/runbook.md: after a PostgreSQL failover, restart Herald)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    if "," not in params.get("host", "") + params.get("hostaddr", ""):
        return dsn
    conn = await asyncio.to_thread(psycopg2.connect, dsn)
    try:
        host, port = conn.info.host, conn.info.port
    finally:
        conn.close()
    logger.info("PostgreSQL: using %s:%s of the DSN's servers", host, port)
    pinned: str = psycopg2.extensions.make_dsn(dsn, host=host, port=str(port), hostaddr=None)
    return pinned


async def create_pool(dsn: str, *, minsize: int = 1, maxsize: int = 10) -> aiopg.Pool:
    """Open a pool; ``timeout`` bounds how long a caller waits for a connection."""
    pool: aiopg.Pool = await aiopg.create_pool(
        await usable_host(dsn), minsize=minsize, maxsize=maxsize, timeout=30.0, pool_recycle=300.0
    )
    return pool


class Database:
    """A thin, typed wrapper over an aiopg pool; every statement is parameterised.
    With a ``monitor``, every statement (BEGIN and COMMIT included) is timed."""

    def __init__(self, pool: aiopg.Pool, *, monitor: QueryMonitor | None = None) -> None:
        self.pool = pool
        self.monitor = monitor

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A connection inside BEGIN … COMMIT (ROLLBACK on any exception)."""
        async with (
            self.pool.acquire() as conn,
            conn.cursor() as cur,
        ):
            # BEGIN/COMMIT go through Tx._run (not aiopg's cur.begin()) so they are timed
            # too: a slow COMMIT is as real to a client as a slow SELECT.
            tx = Tx(cur, self.monitor)
            await tx._run("BEGIN", ())
            try:
                yield tx
            except BaseException:
                if not cur.closed:
                    try:
                        await tx._run("ROLLBACK", ())
                    except Exception as exc:
                        # The connection is broken: close it so the pool drops it, and
                        # let the original error (not this one) reach the caller.
                        logger.warning("rollback failed (%s); closing", exc.__class__.__name__)
                        conn.close()
                raise
            await tx._run("COMMIT", ())

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Tx]:
        """A connection in autocommit mode: each statement commits on its own."""
        async with (
            self.pool.acquire() as conn,
            conn.cursor() as cur,
        ):
            yield Tx(cur, self.monitor)

    async def fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        async with self.connection() as tx:
            return await tx.fetch(sql, params)

    async def fetchrow(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Row | None:
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = await self.fetchrow(sql, params)
        return None if row is None else next(iter(row.values()))

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        async with self.connection() as tx:
            return await tx.execute(sql, params)

    async def close(self) -> None:
        self.pool.close()
        await self.pool.wait_closed()


class Tx:
    """Statements on one connection, usually inside :meth:`Database.transaction`."""

    def __init__(self, cur: Any, monitor: QueryMonitor | None = None) -> None:
        self.cur = cur
        self.monitor = monitor

    async def _run(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> None:
        # The one place every statement passes through: timed here, parameters unseen.
        monitor = self.monitor
        if monitor is None:
            await self.cur.execute(sql, params)
            return
        start = time.perf_counter()
        failed = True
        try:
            await self.cur.execute(sql, params)
            failed = False
        finally:
            monitor.record(sql, time.perf_counter() - start, failed=failed)

    async def fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        await self._run(sql, params)
        if self.cur.description is None:
            return []
        # Plain tuples zipped with the column names: the same dicts RealDictCursor gives,
        # built in C (a 1000-row listing decodes in half the time; see docs/performance.md).
        names = [column[0] for column in self.cur.description]
        rows = await self.cur.fetchall()
        return [dict(zip(names, r, strict=True)) for r in rows]

    async def fetchrow(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Row | None:
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = await self.fetchrow(sql, params)
        return None if row is None else next(iter(row.values()))

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        await self._run(sql, params)
        return int(self.cur.rowcount)
