"""Plain ``.sql`` migrations applied in name order, recorded, under an advisory lock."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from shared.constants import AdvisoryLock
from shared.db.pool import Database

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    return [
        Migration(p.name, p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.sql"))
    ]


async def migrate(db: Database, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; returns the names applied. Safe to run concurrently."""
    applied_now: list[str] = []
    async with db.transaction() as tx:
        # Transaction-scoped lock: a second `migrate` waits here, then sees our rows.
        await tx.execute("SELECT pg_advisory_xact_lock(%s)", (AdvisoryLock.MIGRATE,))
        await tx.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   name text PRIMARY KEY,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["name"]: r["checksum"] for r in await tx.fetch("SELECT * FROM schema_migrations")}
        for m in load_migrations(directory):
            if m.name in done:
                if done[m.name] != m.checksum:
                    logger.warning("migration %s changed after it was applied", m.name)
                continue
            logger.info("applying migration %s", m.name)
            # psycopg2 %-formats any statement sent with a parameter tuple, even an empty
            # one; a migration is plain SQL, so its own % (RAISE '... %', LIKE 'a%') are
            # doubled to reach the server unchanged.
            await tx.execute(m.sql.replace("%", "%%"))
            await tx.execute(
                "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)",
                (m.name, m.checksum),
            )
            applied_now.append(m.name)
    return applied_now
