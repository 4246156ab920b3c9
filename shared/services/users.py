"""Users and their API tokens (stored as sha256, shown once)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import psycopg2.errors

from shared.cache import MetadataCache
from shared.db.pool import Database
from shared.errors import Conflict, NotFound, ValidationError
from shared.models import User
from shared.validation import check_storable

MAX_TOKEN_LEN = 256
MAX_NAME_CHARS = 80

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


def hash_token(token: str) -> bytes:
    # Tokens are 256 random bits, so a fast hash is enough: no dictionary to attack.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class UserService:
    def __init__(self, *, db: Database, cache: MetadataCache | None = None) -> None:
        self.db = db
        self.cache = cache

    async def create(self, name: str, *, is_admin: bool = False) -> tuple[User, str]:
        """Create a user; returns it with its token, which is never stored in clear."""
        name = name.strip()
        check_storable(name, "name")
        if not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable():
            raise ValidationError("name: 1-80 printable characters")
        token = "hrd_" + secrets.token_urlsafe(32)
        try:
            row = await self.db.fetchrow(
                "INSERT INTO users (name, is_admin, token_hash) VALUES (%s, %s, %s)"
                " RETURNING id, name, is_admin",
                (name, is_admin, hash_token(token)),
            )
        except psycopg2.errors.UniqueViolation:
            raise Conflict(f"user {name!r} exists", code="name_taken") from None
        assert row is not None
        return User(row["id"], row["name"], row["is_admin"]), token

    async def authenticate(self, token: str) -> User | None:
        """The user a token belongs to, or None."""
        if not token or len(token) > MAX_TOKEN_LEN:
            return None
        digest = hash_token(token)
        if self.cache is not None:
            # Keyed by the sha256, never the token; unknown tokens are not cached.
            cached = await self.cache.user_for(digest)
            if cached is not None:
                return cached
        row = await self.db.fetchrow(
            "SELECT id, name, is_admin FROM users WHERE token_hash = %s", (digest,)
        )
        if row is None:
            return None
        user = User(row["id"], row["name"], row["is_admin"])
        if self.cache is not None:
            await self.cache.remember_user(digest, user)
        return user

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
