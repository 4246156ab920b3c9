"""Secrets every process of one deployment shares, kept in PostgreSQL (``server_keys``)."""

from __future__ import annotations

import hashlib
import secrets

from shared.db.pool import Database

CURSOR_KEY = "cursor"


async def load_key(db: Database, name: str) -> bytes:
    """The named key as 32 bytes for HMAC. The migration makes it; should the row be
    gone (a restored dump without it), the first process to ask makes a new one and
    every other process reads that one."""
    secret = await db.fetchval(
        "WITH made AS (INSERT INTO server_keys (name, secret) VALUES (%s, %s)"
        "  ON CONFLICT DO NOTHING RETURNING secret)"
        " SELECT secret FROM made UNION ALL SELECT secret FROM server_keys WHERE name = %s",
        (name, secrets.token_hex(32), name),
    )
    return hashlib.sha256(str(secret).encode()).digest()
