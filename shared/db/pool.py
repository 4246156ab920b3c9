"""PostgreSQL access through aiopg: the pool, a transaction helper, dict rows."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiopg
import psycopg2.extras

logger = logging.getLogger(__name__)

Row = dict[str, Any]


async def create_pool(dsn: str, *, minsize: int = 1, maxsize: int = 10) -> aiopg.Pool:
    """Open a pool; ``timeout`` bounds how long a caller waits for a connection."""
    pool: aiopg.Pool = await aiopg.create_pool(
        dsn, minsize=minsize, maxsize=maxsize, timeout=30.0, pool_recycle=300.0
    )
    return pool


class Database:
    """A thin, typed wrapper over an aiopg pool; every statement is parameterised."""

    def __init__(self, pool: aiopg.Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A connection inside BEGIN … COMMIT (ROLLBACK on any exception)."""
        async with (
            self.pool.acquire() as conn,
            conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur,
            cur.begin(),
        ):
            yield Tx(cur)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Tx]:
        """A connection in autocommit mode: each statement commits on its own."""
        async with (
            self.pool.acquire() as conn,
            conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur,
        ):
            yield Tx(cur)

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

    def __init__(self, cur: Any) -> None:
        self.cur = cur

    async def _run(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> None:
        # The one place every statement passes through (timing hooks in here).
        await self.cur.execute(sql, params)

    async def fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        await self._run(sql, params)
        if self.cur.description is None:
            return []
        rows = await self.cur.fetchall()
        return [dict(r) for r in rows]

    async def fetchrow(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Row | None:
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = await self.fetchrow(sql, params)
        return None if row is None else next(iter(row.values()))

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        await self._run(sql, params)
        return int(self.cur.rowcount)
