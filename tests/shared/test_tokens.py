"""API tokens in UserService against real PostgreSQL and Redis: several per user,
expiry, revocation (idempotent, concurrent), the cache entries a revoke and the sweep
drop, last use written at most once a minute, and the 0008 migration keeping old tokens."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from shared.bus import EventBus, TokenRevoked, decode_event, encode_event
from shared.cache import MetadataCache
from shared.constants import events_channel, user_token_cache_key
from shared.db.migrate import MIGRATIONS_DIR, migrate
from shared.db.pool import Database, create_pool
from shared.errors import NotFound, ValidationError
from shared.metrics import Metrics
from shared.models import Credential, User
from shared.services.users import MAX_EXPIRES_DAYS, UserService, hash_token
from shared.settings import Settings
from tests.conftest import _admin, _dsn
from tests.helpers import wait_for


@pytest.fixture
def cache(redis: aioredis.Redis, settings: Settings) -> MetadataCache:
    return MetadataCache(redis=redis, settings=settings, metrics=Metrics.null())


@pytest.fixture
def users(
    db: Database, cache: MetadataCache, redis: aioredis.Redis, settings: Settings
) -> UserService:
    return UserService(db=db, cache=cache, bus=EventBus(redis, settings))


def entry_key(token: str) -> str:
    return user_token_cache_key(hash_token(token).hex())


async def test_several_tokens_each_work_and_list_never_shows_them(
    users: UserService, db: Database
) -> None:
    user, first = await users.create("carol")
    info, second = await users.create_token(user, label="laptop 🚀")
    _, third = await users.create_token(user, expires_in_days=30)
    assert len({first, second, third}) == 3
    for token in (first, second, third):
        cred = await users.authenticate(token)
        assert cred is not None and cred.user == user
    assert (await users.authenticate(second)).token_id == info.id  # type: ignore[union-attr]
    owner, tokens = await users.list_tokens("  carol ")
    assert owner == user
    assert [t.label for t in tokens] == ["first token", "laptop 🚀", None]
    assert [t.status(datetime.now(UTC)) for t in tokens] == ["active"] * 3
    assert tokens[0].expires_at is None and tokens[2].expires_at is not None
    days = (tokens[2].expires_at - tokens[2].created_at).total_seconds() / 86400
    assert 29.99 < days < 30.01
    text = repr(tokens)
    for token in (first, second, third):
        assert token not in text and hash_token(token).hex() not in text
    # The users table holds no token material any more.
    row = await db.fetchrow("SELECT * FROM users WHERE id = %s", (user.id,))
    assert row is not None and "token_hash" not in row


async def test_revoked_token_is_refused_and_the_others_still_work(
    users: UserService, redis: aioredis.Redis, settings: Settings
) -> None:
    user, first = await users.create("dan")
    info, second = await users.create_token(user)
    assert await users.authenticate(second) is not None
    assert await redis.exists(entry_key(second))  # cached by that request
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(events_channel(settings.redis_db))
    try:
        revoked, changed = await users.revoke_token(info.id)
        assert changed and revoked.revoked_at is not None
        assert not await redis.exists(entry_key(second))  # dropped after the commit
        message = None
        async with asyncio.timeout(5):
            while message is None:
                message = await pubsub.get_message(timeout=0.5)
        assert decode_event(message["data"]) == TokenRevoked(info.id, user.id)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert await users.authenticate(second) is None
    cred = await users.authenticate(first)
    assert cred is not None and cred.user == user
    _, tokens = await users.list_tokens("dan")
    assert [t.status(datetime.now(UTC)) for t in tokens] == ["active", "revoked"]


async def test_revoke_is_idempotent_concurrent_and_unknown_ids_are_not_found(
    users: UserService,
) -> None:
    user, _ = await users.create("erin")
    info, token = await users.create_token(user)
    results = await asyncio.gather(*(users.revoke_token(info.id) for _ in range(8)))
    assert sorted(changed for _, changed in results) == [False] * 7 + [True]
    assert len({r.revoked_at for r, _ in results}) == 1  # one revocation time
    assert await users.authenticate(token) is None
    for bad in (0, -1, 999_999, 2**63 - 1):
        with pytest.raises(NotFound) as caught:
            await users.revoke_token(bad)
        assert caught.value.code == "token_not_found"


async def test_expired_token_is_refused_from_the_database_and_from_the_cache(
    users: UserService, db: Database, cache: MetadataCache
) -> None:
    user, _ = await users.create("fay")
    info, token = await users.create_token(user, expires_in_days=1)
    # Already past: the database refuses it.
    await db.execute(
        "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = %s",
        (info.id,),
    )
    assert await users.authenticate(token) is None
    _, tokens = await users.list_tokens("fay")
    assert tokens[-1].status(datetime.now(UTC)) == "expired"
    # About to pass: the entry cached before it carries the expiry and stops answering.
    info, token = await users.create_token(user, expires_in_days=1)
    await db.execute(
        "UPDATE api_tokens SET expires_at = now() + interval '1 second' WHERE id = %s",
        (info.id,),
    )
    cred = await users.authenticate(token)
    assert cred is not None and cred.expires_at is not None
    assert await cache.credential_for(hash_token(token)) == cred
    started = time.monotonic()
    await wait_for(lambda: _refused(users, token), 3, "the expired token refused")
    assert time.monotonic() - started < 2.0


async def _refused(users: UserService, token: str) -> bool:
    return await users.authenticate(token) is None


async def test_cache_entry_never_outlives_the_token(cache: MetadataCache) -> None:
    digest = hashlib.sha256(b"t").digest()
    soon = Credential(User(1, "u", False), 7, time.time() + 0.3)
    await cache.remember_credential(digest, soon)
    assert await cache.credential_for(digest) == soon
    assert 0 < await cache.redis.pttl(user_token_cache_key(digest.hex())) <= 300
    await cache.remember_credential(digest, Credential(User(1, "u", False), 7, time.time() - 1))
    await wait_for(lambda: _gone(cache, digest), 2, "expired entry")


async def _gone(cache: MetadataCache, digest: bytes) -> bool:
    return await cache.credential_for(digest) is None


async def test_sweep_drops_entries_a_revoke_could_not(
    db: Database, cache: MetadataCache, users: UserService, redis: aioredis.Redis
) -> None:
    user, _ = await users.create("gil")
    info, token = await users.create_token(user)
    assert await users.authenticate(token) is not None
    assert await redis.exists(entry_key(token))
    # A revoke that could not reach Redis (no cache, no bus: the CLI with Redis away).
    await UserService(db=db).revoke_token(info.id)
    assert await redis.exists(entry_key(token))
    assert await users.authenticate(token) is not None  # the stale entry, for now
    assert await users.sweep_revocations() == [info.id]
    assert not await redis.exists(entry_key(token))
    assert await users.authenticate(token) is None
    # Old revocations leave the window.
    await db.execute(
        "UPDATE api_tokens SET revoked_at = now() - interval '2 minutes' WHERE id = %s",
        (info.id,),
    )
    assert await users.sweep_revocations() == []


async def test_last_use_is_written_at_most_once_a_minute(db: Database) -> None:
    users = UserService(db=db)  # no cache: every request reads the database
    user, token = await users.create("hal")

    async def last_used() -> datetime | None:
        return await db.fetchval(
            "SELECT last_used_at FROM api_tokens WHERE user_id = %s", (user.id,)
        )

    assert await last_used() is None
    assert await users.authenticate(token) is not None
    first = await last_used()
    assert first is not None
    for _ in range(20):
        assert await users.authenticate(token) is not None
    assert await last_used() == first  # 21 uses, one write
    await db.execute(
        "UPDATE api_tokens SET last_used_at = now() - interval '61 seconds' WHERE user_id = %s",
        (user.id,),
    )
    await users.authenticate(token)
    again = await last_used()
    assert again is not None and again > first


async def test_valid_token_ids_and_cascade_on_user_delete(users: UserService, db: Database) -> None:
    user, _ = await users.create("ivy")
    a, _ = await users.create_token(user)
    b, _ = await users.create_token(user)
    await users.revoke_token(b.id)
    assert await users.valid_token_ids([a.id, b.id, 999]) == {a.id}
    await db.execute("DELETE FROM users WHERE id = %s", (user.id,))
    assert await users.valid_token_ids([a.id]) == set()
    assert await db.fetchval("SELECT count(*) FROM api_tokens") == 0


@pytest.mark.parametrize("days", [0, -1, MAX_EXPIRES_DAYS + 1, 10**12])
async def test_create_token_refuses_bad_days(users: UserService, days: int) -> None:
    user, _ = await users.create("jo")
    with pytest.raises(ValidationError):
        await users.create_token(user, expires_in_days=days)


@pytest.mark.parametrize("label", ["", "x" * 81, "nul\x00", "bad\ud800", "tab\there"])
async def test_create_token_refuses_bad_labels(users: UserService, label: str) -> None:
    user, _ = await users.create("kim")
    with pytest.raises(ValidationError):
        await users.create_token(user, label=label)


@pytest.mark.parametrize(
    "name", ["nobody", "o'brien\"); DROP TABLE api_tokens;--", "Zoë 🚀", "x" * 10_000]
)
async def test_unknown_user_names(users: UserService, name: str) -> None:
    with pytest.raises(NotFound) as caught:
        await users.list_tokens(name)
    assert len(caught.value.message) < 80  # a long name is cut in the message
    with pytest.raises(NotFound):
        await users.by_name(name)


async def test_names_with_quotes_and_unicode_resolve(users: UserService) -> None:
    for name in ["o'brien\"); DROP TABLE api_tokens;--", "Zoë 🚀"]:
        user, _ = await users.create(name)
        _, token = await users.create_token(await users.by_name(name))
        cred = await users.authenticate(token)
        assert cred is not None and cred.user == user


def test_token_revoked_event_round_trip() -> None:
    event = TokenRevoked(5, 9)
    assert decode_event(encode_event(event)) == event
    for bad in (
        {"type": "token_revoked"},
        {"type": "token_revoked", "token_id": "5", "user_id": 9},
        {"type": "token_revoked", "token_id": 5, "user_id": True},
    ):
        assert decode_event(bad) is None


# -- the 0008 migration ------------------------------------------------------------------


@pytest.fixture
def old_url() -> Iterator[str]:
    name = f"herald_tok_mig_{os.getpid()}"
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{name}"')
    yield _dsn(name)
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def old_db(old_url: str) -> AsyncIterator[Database]:
    db = Database(await create_pool(old_url, maxsize=2))
    yield db
    await db.close()


async def test_migration_keeps_existing_tokens_working(old_db: Database, tmp_path: Path) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if path.name < "0008":
            shutil.copy(path, before / path.name)
    await migrate(old_db, before)
    # Users as the previous version made them: one token hash each, in users.
    await old_db.execute(
        "INSERT INTO users (name, token_hash) VALUES (%s, %s), (%s, %s)",
        ("old-a", hash_token("hrd_old_a"), "old-b", hash_token("hrd_old_b")),
    )
    assert (await migrate(old_db))[0] == "0008_tokens.sql"  # and every later one
    users = UserService(db=old_db)
    for name, token in (("old-a", "hrd_old_a"), ("old-b", "hrd_old_b")):
        cred = await users.authenticate(token)
        assert cred is not None and cred.user.name == name and cred.expires_at is None
        _, tokens = await users.list_tokens(name)
        assert [t.label for t in tokens] == ["first token"]
    columns = await old_db.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'"
    )
    assert "token_hash" not in {c["column_name"] for c in columns}
    assert await migrate(old_db) == []  # idempotent
