"""PostgreSQL access through aiopg: the pool, a transaction helper, dict rows, timing.

Every wait on PostgreSQL is bounded from the client side: a frozen or partitioned
server never answers a ``statement_timeout``, so the pool's ``timeout`` (taking a
connection, connecting, each statement) is HERALD_BACKEND_TIMEOUT_S. A statement or
connection that times out or finds the server gone raises
:class:`~shared.errors.BackendUnavailable` (503 with Retry-After to a client); errors
of the statement itself (a constraint, a cancelled query) are raised as they are.
"""

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
from shared.errors import BackendUnavailable

logger = logging.getLogger(__name__)

Row = dict[str, Any]


async def usable_host(dsn: str, wait_s: float) -> str:
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
    connect_timeout = max(1, int(wait_s))
    conn: psycopg2.extensions.connection = await asyncio.to_thread(
        psycopg2.connect, dsn, connect_timeout=connect_timeout
    )
    try:
        host, port = conn.info.host, conn.info.port
    finally:
        conn.close()
    logger.info("PostgreSQL: using %s:%s of the DSN's servers", host, port)
    pinned: str = psycopg2.extensions.make_dsn(dsn, host=host, port=str(port), hostaddr=None)
    return pinned


DEFAULT_TIMEOUT_S = 30.0


async def create_pool(
    dsn: str, *, minsize: int = 1, maxsize: int = 10, wait_s: float = DEFAULT_TIMEOUT_S
) -> aiopg.Pool:
    """Open a pool; ``wait_s`` bounds each wait: for a pooled connection, for a new
    connection, and for each statement (aiopg closes a connection that timed out)."""
    # A failure here (at start-up) is raised as the driver's error: the CLI prints it
    # (its message says which host and why), unlike a client's 503.
    pool: aiopg.Pool = await aiopg.create_pool(
        await usable_host(dsn, wait_s),
        minsize=minsize,
        maxsize=maxsize,
        timeout=wait_s,
        pool_recycle=300.0,
    )
    return pool


def is_unavailable(exc: BaseException) -> bool:
    """Does ``exc`` say "PostgreSQL is not answering" rather than "this statement failed"?"""
    if isinstance(
        exc,
        psycopg2.extensions.QueryCanceledError | psycopg2.extensions.TransactionRollbackError,
    ):
        return False
    if isinstance(exc, TimeoutError | psycopg2.InterfaceError):
        return True
    if isinstance(exc, psycopg2.OperationalError):
        # No SQLSTATE: the connection broke. 08: connection exception; 57P: the server
        # is shutting down or starting up (admin or crash shutdown, cannot connect now).
        code = exc.pgcode or ""
        return code == "" or code.startswith(("08", "57P"))
    return False


def unavailable(exc: BaseException) -> BackendUnavailable:
    # The class name only: driver messages carry hosts and ports.
    what = "did not answer in time" if isinstance(exc, TimeoutError) else "is unavailable"
    return BackendUnavailable(f"the database {what}; retry shortly")


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
            self._acquire() as conn,
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
            self._acquire() as conn,
            conn.cursor() as cur,
        ):
            yield Tx(cur, self.monitor)

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[aiopg.Connection]:
        try:
            conn = await self.pool.acquire()
        except Exception as exc:
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise
        try:
            yield conn
        finally:
            await self.pool.release(conn)

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
        start = time.perf_counter()
        failed = True
        try:
            await self.cur.execute(sql, params)
            failed = False
        except Exception as exc:
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise
        finally:
            if monitor is not None:
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
