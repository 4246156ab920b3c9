"""The audit trail: append-only, hash-chained rows in ``audit_log``.

Each row's ``hash`` is sha256 over its own content and the previous row's hash, so editing
or removing any row breaks the chain from there on. Appends are serialised by a
transaction-scoped advisory lock, which also makes ids gapless (previous id + 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.constants import AdvisoryLock
from shared.db.pool import Database, Row, Tx
from shared.models import iso

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
VERIFY_BATCH = 2000

# Actions (contract: "Attachments: what deletion guarantees").
ATTACHMENT_DELETE = "attachment.delete"
ATTACHMENT_DELETE_DENIED = "attachment.delete_denied"
ATTACHMENT_PATH_REJECTED = "attachment.path_rejected"
ATTACHMENT_FILE_DELETE_RETRY = "attachment.file_delete_retry"
ATTACHMENT_FILE_DELETE_FAILED = "attachment.file_delete_failed"
ORPHAN_DETECTED = "orphan.detected"
ORPHAN_DELETED = "orphan.deleted"
ORPHAN_SCAN = "orphan.scan"

# Results.
OK = "ok"
DENIED = "denied"
FAILED = "failed"
MISSING = "missing"
DRY_RUN = "dry_run"

COLUMNS = (
    "id, at, actor_id, action, target_type, target_id, result, details, client_ip, prev_hash, hash"
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit row to append; ``details`` must be JSON-serialisable."""

    action: str
    target_type: str
    target_id: str | int
    result: str
    actor_id: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    client_ip: str | None = None


def clean_text(value: str) -> str:
    """Text PostgreSQL can store: NUL and lone surrogates replaced."""
    value = value.replace("\x00", "\ufffd")
    return value.encode("utf-8", "replace").decode("utf-8")


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        # jsonb prints numbers in plain notation (1e16 comes back as an int): keep floats
        # to the values that survive the round trip unchanged.
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {clean_text(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def row_hash(row: Row) -> str:
    """The hash of a stored (or about to be stored) row, ``prev_hash`` included."""
    at: datetime = row["at"]
    content = [
        row["id"],
        at.astimezone(UTC).isoformat(),
        row["actor_id"],
        row["action"],
        row["target_type"],
        row["target_id"],
        row["result"],
        row["details"],
        row["client_ip"],
        row["prev_hash"],
    ]
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


# One statement for the chain head and the time, taken after the lock (a statement's
# snapshot starts with it, so the lock cannot share a statement with the read).
HEAD_SQL = (
    "SELECT clock_timestamp() AS now, l.id, l.hash FROM (SELECT 1) AS one"
    " LEFT JOIN LATERAL (SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1) AS l ON true"
)
ROW_PLACEHOLDERS = "(%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)"
INSERT_CHUNK = 500


async def append(tx: Tx, *entries: Entry) -> list[int]:
    """Append entries inside the caller's transaction; returns their ids.

    Call it as the transaction's last statement: the chain lock is held until commit,
    and taking it last keeps that short and free of lock-order deadlocks."""
    if not entries:
        return []
    await tx.execute("SELECT pg_advisory_xact_lock(%s)", (AdvisoryLock.AUDIT_APPEND,))
    head = await tx.fetchrow(HEAD_SQL)
    assert head is not None
    prev_id, prev_hash = (head["id"], head["hash"]) if head["id"] else (0, GENESIS_HASH)
    # Taken under the lock, so times never go backwards along the chain (on one clock).
    now = head["now"]
    values: list[tuple[Any, ...]] = []
    for entry in entries:
        row: Row = {
            "id": prev_id + 1,
            "at": now,
            "actor_id": entry.actor_id,
            "action": entry.action,
            "target_type": clean_text(entry.target_type),
            "target_id": clean_text(str(entry.target_id)),
            "result": entry.result,
            # Round-trip through JSON so the hash covers exactly what jsonb gives back.
            "details": json.loads(canonical_json(_clean(entry.details))),
            "client_ip": entry.client_ip,
            "prev_hash": prev_hash,
        }
        row["hash"] = row_hash(row)
        values.append(
            (
                row["id"],
                row["at"],
                row["actor_id"],
                row["action"],
                row["target_type"],
                row["target_id"],
                row["result"],
                canonical_json(row["details"]),
                row["client_ip"],
                row["prev_hash"],
                row["hash"],
            )
        )
        prev_id, prev_hash = row["id"], row["hash"]
    for i in range(0, len(values), INSERT_CHUNK):
        chunk = values[i : i + INSERT_CHUNK]
        await tx.execute(
            f"INSERT INTO audit_log ({COLUMNS}) VALUES "
            + ", ".join([ROW_PLACEHOLDERS] * len(chunk)),
            [v for row_values in chunk for v in row_values],
        )
    return [v[0] for v in values]


def entry_json(row: Row) -> dict[str, Any]:
    """An audit row as ``GET /admin/audit`` shows it."""
    return {
        "id": row["id"],
        "at": iso(row["at"].astimezone(UTC)),
        "actor_id": row["actor_id"],
        "action": row["action"],
        "target_type": row["target_type"],
        "target_id": row["target_id"],
        "result": row["result"],
        "details": row["details"],
        "client_ip": row["client_ip"],
    }


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    rows: int
    head_id: int
    head_hash: str
    bad_id: int | None = None
    reason: str | None = None


class AuditTrail:
    """Reading and verifying the trail (appending happens inside other transactions)."""

    def __init__(self, *, db: Database) -> None:
        self.db = db

    async def record(self, *entries: Entry) -> None:
        """Append entries in a transaction of their own."""
        async with self.db.transaction() as tx:
            await append(tx, *entries)

    async def query(
        self,
        *,
        action: str | None = None,
        target_type: str | None = None,
        target_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first; every filter optional; ``before_id`` pages backwards."""
        conds: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("action", action),
            ("target_type", target_type),
            ("target_id", target_id),
        ):
            if value is not None:
                conds.append(f"{column} = %s")
                params.append(value)
        if since is not None:
            conds.append("at >= %s")
            params.append(since)
        if until is not None:
            conds.append("at < %s")
            params.append(until)
        if before_id is not None:
            conds.append("id < %s")
            params.append(before_id)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        rows = await self.db.fetch(
            f"SELECT {COLUMNS} FROM audit_log {where} ORDER BY id DESC LIMIT %s",
            (*params, limit),
        )
        return [entry_json(r) for r in rows]

    async def verify(self, *, batch: int = VERIFY_BATCH) -> VerifyResult:
        """Walk the chain in id order; the first row that does not fit is reported."""
        prev_id, prev_hash, count = 0, GENESIS_HASH, 0
        while True:
            rows: Sequence[Row] = await self.db.fetch(
                f"SELECT {COLUMNS} FROM audit_log WHERE id > %s ORDER BY id LIMIT %s",
                (prev_id, batch),
            )
            if not rows:
                return VerifyResult(True, count, prev_id, prev_hash)
            for row in rows:
                reason = None
                if row["id"] != prev_id + 1:
                    reason = f"rows {prev_id + 1}..{row['id'] - 1} are missing"
                elif row["prev_hash"] != prev_hash:
                    reason = "prev_hash does not match the previous row (edited or removed)"
                elif row_hash(row) != row["hash"]:
                    reason = "content does not match its hash (row edited)"
                if reason is not None:
                    return VerifyResult(False, count, prev_id, prev_hash, row["id"], reason)
                prev_id, prev_hash = row["id"], row["hash"]
                count += 1
