"""The framework-free services against real PostgreSQL and Redis, without aiohttp."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared.bus import EventBus, redis_client
from shared.constants import events_channel
from shared.db.pool import Database
from shared.errors import Conflict, Forbidden, NotFound, RetryLater, ValidationError
from shared.metrics import Metrics
from shared.models import User, iso
from shared.services.channels import ChannelService, decode_cursor, encode_cursor
from shared.services.messages import MessageService
from shared.services.users import UserService, hash_token
from shared.settings import Settings
from shared.validation import (
    channel_name,
    check_storable,
    get_bool,
    get_id,
    get_text,
    parse_id,
    parse_int_param,
    require_object,
)


@pytest.fixture
def bus(redis: aioredis.Redis, settings: Settings) -> EventBus:
    return EventBus(redis, settings)


@pytest.fixture
def users(db: Database) -> UserService:
    return UserService(db=db)


@pytest.fixture
def channels(db: Database, bus: EventBus) -> ChannelService:
    return ChannelService(db=db, bus=bus)


@pytest.fixture
def messages(db: Database, bus: EventBus) -> MessageService:
    return MessageService(db=db, bus=bus, metrics=Metrics.null())


class Listener:
    """A real subscription to the bus channel, collecting decoded events."""

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.channel = channel

    async def __aenter__(self) -> Listener:
        await self.pubsub.subscribe(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            msg = await self.pubsub.get_message(timeout=0.5)
            if msg is not None:
                return dict(json.loads(msg["data"]))
        raise AssertionError("no bus event")


# -- users -----------------------------------------------------------------------------


async def test_user_token_is_stored_hashed(users: UserService, db: Database) -> None:
    user, token = await users.create("  carol  ", is_admin=True)
    assert user == User(user.id, "carol", True)
    assert token.startswith("hrd_") and len(token) > 40
    row = await db.fetchrow("SELECT * FROM api_tokens WHERE user_id = %s", (user.id,))
    assert row is not None
    assert bytes(row["token_hash"]) == hash_token(token)
    dump = json.dumps({k: str(v) for k, v in row.items()})
    user_row = await db.fetchrow("SELECT * FROM users WHERE id = %s", (user.id,))
    assert user_row is not None
    dump += json.dumps({k: str(v) for k, v in user_row.items()})
    assert token not in dump and token[4:] not in dump
    cred = await users.authenticate(token)
    assert cred is not None and cred.user == user
    assert await users.get(user.id) == user


@pytest.mark.parametrize(
    "token", ["", "hrd_nope", "x" * 257, "hrd_\x00", "hrd_\ud800", "' OR 1=1 --"]
)
async def test_authenticate_rejects(users: UserService, token: str) -> None:
    await users.create("dave")
    assert await users.authenticate(token) is None


@pytest.mark.parametrize("name", ["", "   ", "a" * 81, "nul\x00", "bad\ud800", "tab\there"])
async def test_user_name_rules(users: UserService, name: str) -> None:
    with pytest.raises(ValidationError):
        await users.create(name)


async def test_user_duplicate_and_missing(users: UserService) -> None:
    await users.create("erin")
    with pytest.raises(Conflict) as info:
        await users.create("erin")
    assert info.value.code == "name_taken"
    with pytest.raises(NotFound):
        await users.get(999_999)


async def test_unicode_and_sql_user_names(users: UserService) -> None:
    for name in ["Zoë 🚀", "Robert'); DROP TABLE users;--", "a" * 80]:
        user, token = await users.create(name)
        cred = await users.authenticate(token)
        assert cred is not None and cred.user == user
        assert user.name == name


# -- channels and members ---------------------------------------------------------------


async def test_channel_lifecycle_and_events(
    users: UserService,
    channels: ChannelService,
    redis: aioredis.Redis,
    settings: Settings,
) -> None:
    owner, _ = await users.create("owner")
    other, _ = await users.create("other")
    created = await channels.create(owner, "general", "hi", False)
    assert created["member_count"] == 1 and created["created_by"] == owner.id
    assert created["created_at"].endswith("Z")
    with pytest.raises(Conflict):
        await channels.create(other, "general", "", False)
    with pytest.raises(Forbidden):
        await channels.update(other, created["id"], name="x", topic=None)
    updated = await channels.update(owner, created["id"], name=None, topic="new")
    assert (updated["name"], updated["topic"]) == ("general", "new")
    async with Listener(redis, events_channel(settings.redis_db)) as bus:
        await channels.add_member(other, created["id"], other.id)  # joins a public channel
        assert (await channels.get(other, created["id"]))["member_count"] == 2
        await channels.remove_member(owner, created["id"], other.id)
        assert await bus.next() == {
            "type": "member_added",
            "channel_id": created["id"],
            "user_id": other.id,
            "since": 0,
        }
        assert await bus.next() == {
            "type": "revoke",
            "channel_id": created["id"],
            "user_id": other.id,
        }
        with pytest.raises(Forbidden):
            await channels.delete(other, created["id"])
        await channels.delete(owner, created["id"])
        assert await bus.next() == {"type": "channel_deleted", "channel_id": created["id"]}
    with pytest.raises(NotFound):
        await channels.get(owner, created["id"])


async def test_private_channel_is_invisible(users: UserService, channels: ChannelService) -> None:
    owner, _ = await users.create("owner")
    other, _ = await users.create("other")
    admin, _ = await users.create("boss", is_admin=True)
    secret = await channels.create(owner, "secret", "", True)
    for call in (
        channels.get(other, secret["id"]),
        channels.update(other, secret["id"], name=None, topic="x"),
        channels.delete(other, secret["id"]),
        channels.add_member(other, secret["id"], other.id),
        channels.remove_member(other, secret["id"], owner.id),
    ):
        with pytest.raises(NotFound) as info:
            await call
        assert info.value.code == "channel_not_found"
    assert (await channels.get(admin, secret["id"]))["name"] == "secret"
    listing = await channels.list_visible(other, limit=10, cursor=None)
    assert listing == {"items": [], "next_cursor": None}
    assert len((await channels.list_visible(admin, limit=10, cursor=None))["items"]) == 1


async def test_member_rules(users: UserService, channels: ChannelService) -> None:
    owner, _ = await users.create("owner")
    other, _ = await users.create("other")
    third, _ = await users.create("third")
    chan = await channels.create(owner, "team", "", False)
    with pytest.raises(Forbidden):  # only the creator adds someone else
        await channels.add_member(other, chan["id"], third.id)
    with pytest.raises(NotFound) as info:
        await channels.add_member(owner, chan["id"], 424242)
    assert info.value.code == "user_not_found"
    await channels.add_member(owner, chan["id"], third.id)
    await channels.add_member(owner, chan["id"], third.id)  # idempotent
    with pytest.raises(Forbidden):
        await channels.remove_member(other, chan["id"], third.id)
    await channels.remove_member(third, chan["id"], third.id)  # leaving
    with pytest.raises(NotFound) as info:
        await channels.remove_member(owner, chan["id"], third.id)
    assert info.value.code == "member_not_found"


@pytest.mark.parametrize("channel_id", [0, 1, 2**63 - 1])
async def test_channel_not_found_ids(
    users: UserService, channels: ChannelService, channel_id: int
) -> None:
    owner, _ = await users.create("owner")
    with pytest.raises(NotFound):
        await channels.get(owner, channel_id)


def test_cursor_round_trip_and_garbage() -> None:
    for value in (0, 1, 2**63 - 1):
        assert decode_cursor(encode_cursor(value)) == value
    assert decode_cursor(None) == 0 and decode_cursor("") == 0
    for bad in ["!!!", "ü", "YTox", encode_cursor(1)[:-1] + "*", "Yzot", "Yzox" * 10, "====="]:
        with pytest.raises(ValidationError):
            decode_cursor(bad)


# -- messages --------------------------------------------------------------------------


async def test_post_publishes_after_commit(
    users: UserService,
    channels: ChannelService,
    messages: MessageService,
    redis: aioredis.Redis,
    settings: Settings,
    db: Database,
) -> None:
    owner, _ = await users.create("owner")
    chan = await channels.create(owner, "news", "", False)
    async with Listener(redis, events_channel(settings.redis_db)) as bus:
        posted = await messages.post(owner, chan["id"], "héllo 🌍")
        event = await bus.next()
    assert event == {"type": "message", "channel_id": chan["id"], "prev_id": 0, "message": posted}
    # Visible to another connection when published: the transaction had committed.
    assert await db.fetchval("SELECT body FROM messages WHERE id = %s", (posted["id"],)) == (
        "héllo 🌍"
    )
    assert posted["author"] == {"id": owner.id, "name": "owner"}


async def test_paging_and_read_marks(
    users: UserService, channels: ChannelService, messages: MessageService
) -> None:
    owner, _ = await users.create("owner")
    reader, _ = await users.create("reader")
    chan = await channels.create(owner, "log", "", False)
    ids = [(await messages.post(owner, chan["id"], f"m{i}"))["id"] for i in range(10)]
    await channels.add_member(reader, chan["id"], reader.id)
    page = await messages.page(reader, chan["id"], before=None, after=None, limit=3)
    assert [m["id"] for m in page] == ids[-3:]
    page = await messages.page(reader, chan["id"], before=ids[5], after=None, limit=3)
    assert [m["id"] for m in page] == ids[2:5]
    page = await messages.page(reader, chan["id"], before=None, after=ids[1], limit=3)
    assert [m["id"] for m in page] == ids[2:5]
    page = await messages.page(reader, chan["id"], before=ids[6], after=ids[2], limit=100)
    assert [m["id"] for m in page] == ids[3:6]
    assert [m["id"] for m in await messages.since(chan["id"], ids[7], 10)] == ids[8:]
    assert await messages.newest_id(chan["id"]) == ids[-1]
    assert await messages.newest_id(999_999) == 0


async def test_bus_publish_failure_is_logged_not_raised(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # A Redis nobody listens on: the message is stored already, so publishing must not fail.
    dead = redis_client(replace(settings, redis_url="redis://127.0.0.1:1/0"))
    try:
        with caplog.at_level(logging.WARNING, logger="shared.bus"):
            await EventBus(dead, settings).channel_deleted(1)
    finally:
        await dead.aclose()
    assert "publishing channel_deleted event failed" in caplog.text
    # One line per failure, no traceback: an outage sends every post here.
    assert all(r.exc_info is None for r in caplog.records)


# -- validation helpers and models ---------------------------------------------------------


def test_validation_helpers() -> None:
    assert check_storable("ok ✓", "f") == "ok ✓"
    for bad in ("a\x00b", "\udfff"):
        with pytest.raises(ValidationError):
            check_storable(bad, "f")
    with pytest.raises(ValidationError, match="JSON object"):
        require_object([1], {"a"})
    with pytest.raises(ValidationError, match="unknown field"):
        require_object({"a": 1, "zz": 2}, {"a"})
    assert get_text({}, "t", required=False, max_len=3, default="d") == "d"
    with pytest.raises(ValidationError, match="required"):
        get_text({"t": None}, "t", max_len=3)
    with pytest.raises(ValidationError, match="string"):
        get_text({"t": 5}, "t", max_len=3)
    with pytest.raises(ValidationError, match="length"):
        get_text({"t": "abcd"}, "t", max_len=3)
    assert get_text({"t": "€€€"}, "t", max_len=3) == "€€€"  # characters, not bytes
    assert get_bool({}, "b", default=True) is True
    with pytest.raises(ValidationError):
        get_bool({"b": 1}, "b", default=False)
    for bad_id in (None, True, "1", 1.0, 0, -1, 2**63):
        with pytest.raises(ValidationError):
            get_id({"i": bad_id}, "i")
    assert get_id({"i": 2**63 - 1}, "i") == 2**63 - 1
    for raw in ("0", "-1", "1.5", "", "٣", "9" * 20, "9223372036854775808", " 1", "+1"):
        with pytest.raises(ValidationError):
            parse_id(raw)
    assert parse_id("9223372036854775807") == 2**63 - 1
    for raw in ("0", "1001", "x", "--5", "-", "1e3", "²"):
        with pytest.raises(ValidationError):
            parse_int_param(raw, "limit", default=5, minimum=1, maximum=1000)
    assert parse_int_param(None, "limit", default=5, minimum=1, maximum=1000) == 5
    assert parse_int_param(" 7 ", "limit", default=5, minimum=1, maximum=1000) == 7
    assert parse_int_param("-3", "n", default=0, minimum=-5, maximum=5) == -3
    for bad_name in (None, "", "A", "a b", "a" * 81, "é", "a/b", "a\n"):
        with pytest.raises(ValidationError):
            channel_name(bad_name)
    assert channel_name("a-b_c9") == "a-b_c9"


def test_errors_and_iso() -> None:
    err = RetryLater("busy", code="queue_full", retry_after=0, status=429)
    assert (err.status, err.code, err.headers) == (429, "queue_full", {"Retry-After": "1"})
    assert NotFound("x").headers == {}
    assert iso(None) is None
    assert iso(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    plus_two = timezone(timedelta(hours=2))
    assert iso(datetime(2026, 1, 2, tzinfo=plus_two)) == "2026-01-02T00:00:00+02:00"
