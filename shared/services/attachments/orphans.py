"""The orphan scan: files on disk with no row, rows with no file, failed deletions.

The upload tree is walked lazily (one directory iterator per level) and looked up in
batches, so memory stays flat however many files there are. A file is removed only if it
is a regular file past ``HERALD_ORPHAN_GRACE_S``, no row claims it, and no upload holds
its key's advisory lock (an upload takes that lock before the rename and keeps it until
its row commits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

from shared.constants import AdvisoryLock
from shared.db.pool import Database, Tx
from shared.enforcement import ORPHAN_DELETION, Enforcement
from shared.metrics import Metrics
from shared.services import audit
from shared.services.attachments.deletions import FileDeletions
from shared.services.attachments.storage import STALE_TEMP_S, FoundFile, PathRejected, Storage
from shared.services.audit import AuditTrail
from shared.settings import Settings

logger = logging.getLogger(__name__)

LOOKUP_BATCH = 1000

# Told how far a scan is after each batch and each phase (``herald jobs enqueue --wait``
# shows it); it must be cheap, since it runs once per LOOKUP_BATCH files.
Progress = Callable[[dict[str, Any]], Awaitable[None]]


async def _no_progress(figures: dict[str, Any]) -> None:
    return None


@dataclass(slots=True)
class ScanSummary:
    scanned: int = 0
    orphans: int = 0
    deleted: int = 0
    bytes_freed: int = 0
    orphan_bytes: int = 0
    dangling_rows: int = 0
    young_skipped: int = 0
    in_progress_skipped: int = 0
    special_files: int = 0
    delete_errors: int = 0
    stale_temp_files: int = 0
    retried: int = 0
    retry_removed: int = 0
    retry_failed: int = 0
    dry_run: bool = False
    duration_ms: int = 0


def storable(key: str) -> bool:
    """False for names that are not valid UTF-8 (kept as surrogates by os.fsdecode):
    no row can hold them, and PostgreSQL cannot receive them."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in key


def _take(it: Any, n: int) -> list[FoundFile]:
    return list(islice(it, n))


class OrphanScanner:
    def __init__(
        self,
        *,
        db: Database,
        settings: Settings,
        metrics: Metrics,
        storage: Storage,
        files: FileDeletions,
        audit: AuditTrail,
        enforcement: Enforcement,
    ) -> None:
        self.db = db
        self.enforcement = enforcement
        self.settings = settings
        self.metrics = metrics
        self.storage = storage
        self.files = files
        self.audit = audit

    async def scan(
        self, *, dry_run: bool = False, progress: Progress = _no_progress
    ) -> dict[str, Any]:
        """One full scan; returns the summary also written to the audit trail.
        ``progress`` hears the figures so far after every batch of files."""
        # Held (session-level) for a whole scan, so a cron run and an operator run never
        # overlap.
        async with self.db.connection() as lock:
            if not await lock.fetchval(
                "SELECT pg_try_advisory_lock(%s)", (AdvisoryLock.ORPHAN_SCAN,)
            ):
                logger.info("orphan scan skipped: another scan is running")
                return {"skipped": "another orphan scan is running"}
            try:
                return await self._scan(dry_run, progress)
            finally:
                await lock.execute("SELECT pg_advisory_unlock(%s)", (AdvisoryLock.ORPHAN_SCAN,))

    async def _scan(self, dry_run: bool, progress: Progress) -> dict[str, Any]:
        started = time.time()
        summary = ScanSummary(dry_run=dry_run)
        cutoff = started - self.settings.orphan_grace_s

        async def report(phase: str) -> None:
            await progress({"phase": phase, "scanned": summary.scanned, "orphans": summary.orphans})

        walker = self.storage.walk()
        try:
            while batch := await asyncio.to_thread(_take, walker, LOOKUP_BATCH):
                await self._files_batch(batch, cutoff, summary)
                await report("files")
        finally:
            walker.close()
        await report("rows")
        await self._dangling_rows(started, summary)
        summary.stale_temp_files = await asyncio.to_thread(
            self.storage.remove_stale_temps,
            older_than=started - max(self.settings.orphan_grace_s, STALE_TEMP_S),
            dry_run=dry_run,
        )
        sweep = await self.files.sweep(dry_run=dry_run)
        summary.retried = sweep.candidates
        summary.retry_removed = sweep.removed + sweep.missing
        summary.retry_failed = sweep.failed + sweep.rejected
        summary.duration_ms = int((time.time() - started) * 1000)
        result = asdict(summary)
        await self.audit.record(
            audit.Entry(
                audit.ORPHAN_SCAN,
                "upload_dir",
                "-",
                audit.DRY_RUN if dry_run else audit.OK,
                details=result,
            )
        )
        logger.info("orphan scan done: %s", result)
        return result

    async def _claimed(self, tx: Tx | Database, keys: list[str]) -> set[str]:
        """Keys a row still points at (a ``deleted`` row no longer claims its file)."""
        if not keys:
            return set()
        rows = await tx.fetch(
            "SELECT storage_key FROM attachments WHERE storage_key = ANY(%s)"
            " AND state <> 'deleted'",
            (keys,),
        )
        return {r["storage_key"] for r in rows}

    async def _files_batch(self, batch: list[FoundFile], cutoff: float, s: ScanSummary) -> None:
        s.scanned += len(batch)
        old = []
        for f in batch:
            if f.mtime >= cutoff:
                s.young_skipped += 1
            else:
                old.append(f)
        claimed = await self._claimed(self.db, [f.key for f in old if storable(f.key)])
        orphans = [f for f in old if f.key not in claimed]
        if not orphans:
            return
        special = [f for f in orphans if not f.regular]
        regular = [f for f in orphans if f.regular]
        entries: list[audit.Entry] = []
        for f in special:
            # Symlinks and other special files are reported, never followed or removed.
            s.special_files += 1
            entries.append(self._detected(f, audit.DENIED, {"kind": "not_a_regular_file"}))
        observed = (
            not s.dry_run
            and bool(regular)
            and not self.enforcement.enforces(
                ORPHAN_DELETION, f"removing {len(regular)} orphan files", count=len(regular)
            )
        )
        if s.dry_run or observed:
            extra = {"observe_only": True} if observed else {}
            for f in regular:
                s.orphans += 1
                s.orphan_bytes += f.size
                entries.append(self._detected(f, audit.DRY_RUN, extra))
            await self.audit.record(*entries)
            self.metrics.orphan_files.labels(result="dry_run").inc(len(regular))
            return
        async with self.db.transaction() as tx:
            keys = [f.key for f in regular if storable(f.key)]
            busy: set[str] = set()
            if keys:
                # An upload between its INSERT and COMMIT holds this lock: skip its file.
                rows = await tx.fetch(
                    "SELECT k FROM unnest(%s::text[]) AS k"
                    " WHERE NOT pg_try_advisory_xact_lock(%s, hashtext(k))",
                    (keys, AdvisoryLock.UPLOAD_KEY),
                )
                busy = {r["k"] for r in rows}
                # Re-read under the locks: an upload may have committed since the lookup.
                busy |= await self._claimed(tx, [k for k in keys if k not in busy])
            for f in regular:
                if f.key in busy:
                    s.in_progress_skipped += 1
                    continue
                try:
                    removed = await asyncio.to_thread(
                        self.storage.unlink_orphan, f.key, older_than=cutoff
                    )
                except (OSError, PathRejected) as exc:
                    s.orphans += 1
                    s.orphan_bytes += f.size
                    s.delete_errors += 1
                    error = f"{exc.__class__.__name__}: {exc}"
                    entries.append(self._detected(f, audit.OK, {}))
                    entries.append(self._deleted(f, audit.FAILED, {"error": error}))
                    self.metrics.orphan_files.labels(result="failed").inc()
                    continue
                if not removed:
                    continue  # gone, or modified since the walk: not ours to judge now
                s.orphans += 1
                s.orphan_bytes += f.size
                s.deleted += 1
                s.bytes_freed += f.size
                entries.append(self._detected(f, audit.OK, {}))
                entries.append(self._deleted(f, audit.OK, {}))
                self.metrics.orphan_files.labels(result="deleted").inc()
            await audit.append(tx, *entries)

    def _detected(self, f: FoundFile, result: str, extra: dict[str, Any]) -> audit.Entry:
        details = {"size": f.size, "age_s": int(time.time() - f.mtime), **extra}
        return audit.Entry(audit.ORPHAN_DETECTED, "file", f.key, result, details=details)

    def _deleted(self, f: FoundFile, result: str, extra: dict[str, Any]) -> audit.Entry:
        return audit.Entry(
            audit.ORPHAN_DELETED, "file", f.key, result, details={"size": f.size, **extra}
        )

    async def _dangling_rows(self, started: float, s: ScanSummary) -> None:
        """Active rows (older than the scan) whose file is not there: reported, kept."""
        after = 0
        while True:
            rows = await self.db.fetch(
                "SELECT id, storage_key FROM attachments WHERE state = 'active' AND id > %s"
                " AND created_at < to_timestamp(%s) ORDER BY id LIMIT %s",
                (after, started, LOOKUP_BATCH),
            )
            if not rows:
                return
            after = rows[-1]["id"]
            problems = await asyncio.to_thread(self._check_rows, rows)
            if not problems:
                continue
            # A delete may have committed between our read and the stat: re-check.
            still = await self.db.fetch(
                "SELECT id FROM attachments WHERE id = ANY(%s) AND state = 'active'",
                (list(problems),),
            )
            entries = []
            for r in still:
                s.dangling_rows += 1
                entries.append(
                    audit.Entry(
                        audit.ORPHAN_DETECTED,
                        "attachment",
                        r["id"],
                        audit.MISSING,
                        details={"kind": "dangling_row", "problem": problems[r["id"]]},
                    )
                )
            await self.audit.record(*entries)

    def _check_rows(self, rows: list[dict[str, Any]]) -> dict[int, str]:
        problems: dict[int, str] = {}
        for row in rows:
            try:
                if not self.storage.validate(row["storage_key"]):
                    problems[row["id"]] = "file missing"
            except PathRejected as exc:
                problems[row["id"]] = f"path rejected: {exc}"
            except OSError as exc:
                problems[row["id"]] = f"{exc.__class__.__name__}: {exc.strerror}"
        return problems
