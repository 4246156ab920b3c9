"""Statements on a PostgreSQL server's maintenance database (CREATE/DROP DATABASE), for
the test suite's and the benchmarks' throwaway databases."""

from __future__ import annotations

import psycopg2


def admin_exec(admin_dsn: str, sql: str) -> None:
    """Run one statement outside a transaction (CREATE DATABASE cannot run inside one)."""
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def dsn_for(admin_dsn: str, dbname: str) -> str:
    """The DSN of database ``dbname`` on the same server as ``admin_dsn``."""
    return admin_dsn.rpartition("/")[0] + "/" + dbname
