"""The hash-chained audit trail: appends, verification, tamper detection, the CLI."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys

import psycopg2
import pytest

from shared.services import audit
from shared.services.audit import AuditTrail, Entry


def entry(i: int = 0, **kw) -> Entry:
    base = {
        "action": "attachment.delete",
        "target_type": "attachment",
        "target_id": i,
        "result": "ok",
        "actor_id": 1,
        "details": {"n": i},
        "client_ip": "10.0.0.1",
    }
    base.update(kw)
    return Entry(**base)


async def fill(db, n: int) -> AuditTrail:
    trail = AuditTrail(db=db)
    for i in range(n):
        await trail.record(entry(i))
    return trail


async def tamper(db, sql: str, params=()) -> None:
    """As a superuser with triggers off: what an attacker with DB access could do."""
    async with db.transaction() as tx:
        await tx.execute("SET LOCAL session_replication_role = replica")
        await tx.execute(sql, params)


async def test_chain_links_and_verifies(db):
    trail = await fill(db, 5)
    rows = await db.fetch("SELECT * FROM audit_log ORDER BY id")
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["prev_hash"] == audit.GENESIS_HASH
    for prev, row in itertools.pairwise(rows):
        assert row["prev_hash"] == prev["hash"]
        assert row["at"] >= prev["at"]
    result = await trail.verify()
    assert result.ok and result.rows == 5 and result.head_id == 5
    assert result.head_hash == rows[-1]["hash"]


async def test_empty_trail_verifies(db):
    result = await AuditTrail(db=db).verify()
    assert result.ok and result.rows == 0 and result.head_hash == audit.GENESIS_HASH


async def test_rolled_back_append_leaves_no_gap(db):
    trail = AuditTrail(db=db)
    await trail.record(entry(1))
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await audit.append(tx, entry(2))
            raise RuntimeError("caller failed after appending")
    await trail.record(entry(3))
    assert [r["id"] for r in await db.fetch("SELECT id FROM audit_log ORDER BY id")] == [1, 2]
    assert (await trail.verify()).ok


async def test_update_and_delete_are_refused_by_the_database(db):
    await fill(db, 2)
    with pytest.raises(psycopg2.Error, match="append-only"):
        await db.execute("UPDATE audit_log SET result = 'denied' WHERE id = 1")
    with pytest.raises(psycopg2.Error, match="append-only"):
        await db.execute("DELETE FROM audit_log WHERE id = 2")
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 2


@pytest.mark.parametrize(
    ("sql", "bad_id", "reason"),
    [
        ("UPDATE audit_log SET result = 'denied' WHERE id = 3", 3, "content"),
        ("UPDATE audit_log SET details = '{\"n\": 99}' WHERE id = 2", 2, "content"),
        ("UPDATE audit_log SET at = at - interval '1 day' WHERE id = 4", 4, "content"),
        ("UPDATE audit_log SET client_ip = '6.6.6.6' WHERE id = 1", 1, "content"),
        ("DELETE FROM audit_log WHERE id = 3", 4, "missing"),
        ("DELETE FROM audit_log WHERE id = 1", 2, "missing"),
    ],
)
async def test_tampering_is_found_at_the_first_bad_row(db, sql, bad_id, reason):
    trail = await fill(db, 6)
    await tamper(db, sql)
    result = await trail.verify()
    assert not result.ok
    assert result.bad_id == bad_id
    assert reason in result.reason


async def test_removal_hidden_by_renumbering_is_found(db):
    trail = await fill(db, 6)
    await tamper(db, "DELETE FROM audit_log WHERE id = 3")
    await tamper(db, "UPDATE audit_log SET id = id - 1 WHERE id > 3")
    result = await trail.verify()
    assert not result.ok and result.bad_id == 3


async def test_rehashing_the_edited_row_breaks_the_next_link(db):
    trail = await fill(db, 4)
    row = await db.fetchrow("SELECT * FROM audit_log WHERE id = 2")
    row["result"] = "denied"
    await tamper(
        db,
        "UPDATE audit_log SET result = 'denied', hash = %s WHERE id = 2",
        (audit.row_hash(row),),
    )
    result = await trail.verify()
    assert not result.ok and result.bad_id == 3 and "prev_hash" in result.reason


async def test_concurrent_appends_stay_one_chain(db):
    trail = AuditTrail(db=db)
    await asyncio.gather(*(trail.record(entry(i), entry(i + 1000)) for i in range(40)))
    ids = [r["id"] for r in await db.fetch("SELECT id FROM audit_log ORDER BY id")]
    assert ids == list(range(1, 81))
    assert (await trail.verify()).ok


async def test_awkward_details_survive_the_round_trip(db):
    trail = AuditTrail(db=db)
    await trail.record(
        entry(
            details={
                "nul": "a\x00b",
                "surrogate": "x\ud800y",
                "big": 1e16,
                "nan": float("nan"),
                "small": 0.1,
                "nested": {"list": [1, "two", None, True], "ü": "日本"},
                "quote": "'; DROP TABLE audit_log; --",
            },
            target_id="path/with\x00nul",
        )
    )
    assert (await trail.verify()).ok
    row = await db.fetchrow("SELECT details, target_id FROM audit_log")
    assert "\x00" not in row["target_id"]
    assert row["details"]["quote"] == "'; DROP TABLE audit_log; --"


async def test_query_filters(db):
    trail = AuditTrail(db=db)
    await trail.record(
        entry(1), entry(2, action="orphan.detected", target_type="file", target_id="ab/cd")
    )
    items = await trail.query(action="orphan.detected")
    assert [i["target_id"] for i in items] == ["ab/cd"]
    items = await trail.query(target_type="attachment", target_id="1")
    assert len(items) == 1 and items[0]["details"] == {"n": 1}
    assert [i["id"] for i in await trail.query()] == [2, 1]
    assert [i["id"] for i in await trail.query(before_id=2)] == [1]


def run_cli(database_url: str, cwd) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "DATABASE_"))}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "herald", "audit", "verify"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_cli_audit_verify(db, settings, tmp_path):
    await fill(db, 3)
    ok = await asyncio.to_thread(run_cli, settings.database_url, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "ok: 3 rows" in ok.stdout
    await tamper(db, "UPDATE audit_log SET action = 'x' WHERE id = 2")
    bad = await asyncio.to_thread(run_cli, settings.database_url, tmp_path)
    assert bad.returncode == 1
    assert "row 2" in bad.stdout
