"""Users and their API tokens: several per user, each stored as its sha256 (the token is
shown once), optionally expiring, revocable.

A revoke commits, then drops the token's cache entry and tells every server process on
the bus (they close the streams it opened). Neither is needed for the refusal to hold
within 2 s: each server process sweeps recent revocations from PostgreSQL every second
(cache entries: shared/cache.py; streams: server/sse/tokens.py).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2.errors

from shared.bus import EventBus
from shared.cache import MetadataCache
from shared.db.pool import Database
from shared.errors import Conflict, NotFound, ValidationError
from shared.models import Credential, User
from shared.validation import check_storable

logger = logging.getLogger(__name__)

MAX_TOKEN_LEN = 256
MAX_NAME_CHARS = 80
MAX_LABEL_CHARS = 80
# Ten years: beyond that "never" says it better, and the date stays far from overflow.
MAX_EXPIRES_DAYS = 3650
FIRST_LABEL = "first token"
# Revocations are swept for the cache's TTL plus this: a loader that read a token just
# before its revoke committed stores its entry well within it.
SWEEP_MARGIN_S = 10.0

# One statement per cache miss: the token's user, if the token is neither revoked nor
# expired, and whether its last use is old enough to record again.
AUTH_SQL = """
SELECT u.id, u.name, u.is_admin, t.id AS token_id,
       extract(epoch FROM t.expires_at)::float8 AS expires_at,
       (t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute') AS stale
FROM api_tokens t JOIN users u ON u.id = t.user_id
WHERE t.token_hash = %s AND t.revoked_at IS NULL
  AND (t.expires_at IS NULL OR t.expires_at > now())
"""
# last_used_at is written at most once a minute per token (the condition holds under
# concurrent requests too), not once per request: a busy token costs no write load.
TOUCH_SQL = """
UPDATE api_tokens SET last_used_at = now()
WHERE id = %s AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
"""
# What TokenInfo holds, as every statement below returns it.
INFO_FIELDS = ("id", "user_id", "label", "created_at", "last_used_at", "expires_at", "revoked_at")

# Names starting with a prefix, case-insensitively, in one range scan of
# users_name_prefix_idx (0007_client_reads.sql): lower(name) LIKE 'p%' on a
# text_pattern_ops index, ordered by that index's own operator (~<~, byte order) so no
# sort runs however many names match. The prefix is folded by the same lower() as the
# index, and arrives with LIKE's wildcards escaped (escape_like): it is literal text.
SEARCH_SQL = """
SELECT id, name FROM users
WHERE lower(name) LIKE lower(%(pattern)s)
ORDER BY lower(name) USING ~<~, id
LIMIT %(limit)s
"""


def escape_like(text: str) -> str:
    """``text`` as a LIKE pattern that matches only itself (backslash is the escape)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for a one-line message, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def new_token() -> str:
    return "hrd_" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One API token as operators see it (never the token or its hash)."""

    id: int
    user_id: int
    label: str | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TokenInfo:
        return cls(**{k: row[k] for k in INFO_FIELDS})


def hash_token(token: str) -> bytes:
    # Tokens are 256 random bits, so a fast hash is enough: no dictionary to attack.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class UserService:
    def __init__(
        self, *, db: Database, cache: MetadataCache | None = None, bus: EventBus | None = None
    ) -> None:
        self.db = db
        self.cache = cache
        self.bus = bus

    async def create(self, name: str, *, is_admin: bool = False) -> tuple[User, str]:
        """Create a user with a first token; returns both (the token is stored hashed)."""
        name = name.strip()
        check_storable(name, "name")
        if not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable():
            raise ValidationError("name: 1-80 printable characters")
        token = new_token()
        try:
            async with self.db.transaction() as tx:
                row = await tx.fetchrow(
                    "INSERT INTO users (name, is_admin) VALUES (%s, %s)"
                    " RETURNING id, name, is_admin",
                    (name, is_admin),
                )
                assert row is not None
                await tx.execute(
                    "INSERT INTO api_tokens (user_id, token_hash, label) VALUES (%s, %s, %s)",
                    (row["id"], hash_token(token), FIRST_LABEL),
                )
        except psycopg2.errors.UniqueViolation:
            raise Conflict(f"user {name!r} exists", code="name_taken") from None
        return User(row["id"], row["name"], row["is_admin"]), token

    async def cached_credential(self, token: str) -> Credential | None:
        """The credential a token gives, from the cache only (None: not there)."""
        if self.cache is None or not token or len(token) > MAX_TOKEN_LEN:
            return None
        # Keyed by the sha256, never the token; unknown tokens are not cached.
        return await self.cache.credential_for(hash_token(token))

    async def authenticate(self, token: str, *, cache_read: bool = True) -> Credential | None:
        """The credential a token gives, or None: unknown, revoked or expired.
        ``cache_read=False``: the caller already asked ``cached_credential``."""
        if not token or len(token) > MAX_TOKEN_LEN:
            return None
        digest = hash_token(token)
        if self.cache is not None and cache_read:
            cached = await self.cache.credential_for(digest)
            if cached is not None:
                return cached
        row = await self.db.fetchrow(AUTH_SQL, (digest,))
        if row is None:
            return None
        if row["stale"]:
            await self.db.execute(TOUCH_SQL, (row["token_id"],))
        cred = Credential(
            User(row["id"], row["name"], row["is_admin"]), row["token_id"], row["expires_at"]
        )
        if self.cache is not None:
            await self.cache.remember_credential(digest, cred)
        return cred

    async def by_name(self, name: str) -> User:
        """The user called ``name`` (surrounding spaces dropped, as ``create`` does)."""
        name = name.strip()
        check_storable(name, "name")
        row = await self.db.fetchrow(
            "SELECT id, name, is_admin FROM users WHERE name = %s", (name,)
        )
        if row is None:
            raise NotFound(f"user {shown(name)} not found", code="user_not_found")
        return User(row["id"], row["name"], row["is_admin"])

    async def create_token(
        self, user: User, *, expires_in_days: int | None = None, label: str | None = None
    ) -> tuple[TokenInfo, str]:
        """A new token for ``user``, valid for ``expires_in_days`` days (None: until
        revoked); returns it once, with its record."""
        if expires_in_days is not None and not 1 <= expires_in_days <= MAX_EXPIRES_DAYS:
            raise ValidationError(f"expires_in_days: 1-{MAX_EXPIRES_DAYS} days")
        if label is not None:
            check_storable(label, "label")
            if not 1 <= len(label) <= MAX_LABEL_CHARS or not label.isprintable():
                raise ValidationError(f"label: 1-{MAX_LABEL_CHARS} printable characters")
        token = new_token()
        try:
            row = await self.db.fetchrow(
                "INSERT INTO api_tokens (user_id, token_hash, label, expires_at)"
                " VALUES (%s, %s, %s, now() + make_interval(days => %s))"
                " RETURNING id, user_id, label, created_at, last_used_at, expires_at,"
                " revoked_at",
                (user.id, hash_token(token), label, expires_in_days),
            )
        except psycopg2.errors.ForeignKeyViolation:
            raise NotFound(f"user {user.id} not found", code="user_not_found") from None
        assert row is not None
        return TokenInfo.from_row(row), token

    async def list_tokens(self, name: str) -> tuple[User, list[TokenInfo]]:
        """The user called ``name`` and every token it holds or held, oldest first."""
        user = await self.by_name(name)
        rows = await self.db.fetch(
            "SELECT id, user_id, label, created_at, last_used_at, expires_at, revoked_at"
            " FROM api_tokens WHERE user_id = %s ORDER BY id",
            (user.id,),
        )
        return user, [TokenInfo.from_row(r) for r in rows]

    async def revoke_token(self, token_id: int) -> tuple[TokenInfo, bool]:
        """Revoke a token (refused everywhere within 2 s, its streams closed); returns it
        and whether this call revoked it (False: it already was). Unknown → NotFound."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                "UPDATE api_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL"
                " RETURNING id, user_id, label, created_at, last_used_at, expires_at,"
                " revoked_at, token_hash",
                (token_id,),
            )
            changed = row is not None
            if row is None:
                # Already revoked (a concurrent revoke waited on the row lock, then saw
                # revoked_at set), or no such token.
                row = await tx.fetchrow(
                    "SELECT id, user_id, label, created_at, last_used_at, expires_at,"
                    " revoked_at, token_hash FROM api_tokens WHERE id = %s",
                    (token_id,),
                )
        if row is None:
            raise NotFound(f"token {token_id} not found", code="token_not_found")
        info = TokenInfo.from_row(row)
        # After the commit, and again for an already revoked token (its first revoke may
        # have lost these to a Redis outage). Both are best-effort: see the docstring.
        if self.cache is not None:
            await self.cache.forget_credentials([bytes(row["token_hash"])])
        if self.bus is not None:
            await self.bus.token_revoked(info.id, info.user_id)
        return info, changed

    async def sweep_revocations(self) -> list[int]:
        """Delete the cache entries of every token revoked within the cache's TTL and a
        margin (again: a revoke's own delete may have been lost) and return their ids.
        Each server process calls this every second (shared/cache.py says why)."""
        within_s = (self.cache.user_ttl_s if self.cache is not None else 0) + SWEEP_MARGIN_S
        rows = await self.db.fetch(
            "SELECT id, token_hash FROM api_tokens"
            " WHERE revoked_at > now() - make_interval(secs => %s)",
            (within_s,),
        )
        if rows and self.cache is not None:
            await self.cache.forget_credentials([bytes(r["token_hash"]) for r in rows])
        return [int(r["id"]) for r in rows]

    async def valid_token_ids(self, token_ids: list[int]) -> set[int]:
        """Which of ``token_ids`` are still neither revoked nor expired (nor deleted with
        their user)."""
        rows = await self.db.fetch(
            "SELECT id FROM api_tokens WHERE id = ANY(%s) AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now())",
            (token_ids,),
        )
        return {int(r["id"]) for r in rows}

    async def search(self, prefix: str, *, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` users whose name starts with ``prefix`` (case-insensitive), in
        name order; every wildcard in ``prefix`` is taken literally."""
        rows = await self.db.fetch(
            SEARCH_SQL, {"pattern": escape_like(prefix) + "%", "limit": limit}
        )
        return [{"id": r["id"], "name": r["name"]} for r in rows]

    async def get(self, user_id: int) -> User:
        row = await self.db.fetchrow(
            "SELECT id, name, is_admin FROM users WHERE id = %s", (user_id,)
        )
        if row is None:
            raise NotFound("user not found", code="user_not_found")
        return User(row["id"], row["name"], row["is_admin"])
