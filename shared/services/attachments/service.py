"""Attachments: streamed upload, metadata, download, and deletion in its safe order.

Deletion order (docs/attachments.md): ownership (else 403, audited) → path validation
(else refused, audited) → existence check → the row leaves the users' view in the same
transaction as its audit entry → commit → only then the file is removed; a failed removal
is handed to the worker's retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import unicodedata
from collections.abc import AsyncIterable
from dataclasses import dataclass, replace
from datetime import UTC
from typing import Any

from arq.connections import ArqRedis

from shared.constants import JOB_DELETE_ATTACHMENT_FILE, QUEUE_NAME, AdvisoryLock
from shared.db.pool import Database, Row
from shared.errors import Conflict, Forbidden, NotFound, PayloadTooLarge
from shared.metrics import Metrics
from shared.models import User, iso
from shared.services import audit
from shared.services.attachments import deletions as file_deletions
from shared.services.attachments.deletions import FileDeletions
from shared.services.attachments.storage import PathRejected, Storage, TooLarge, new_key
from shared.services.audit import AuditTrail
from shared.services.channels import visible_channel
from shared.settings import Settings
from shared.validation import check_storable

logger = logging.getLogger(__name__)

MAX_FILENAME_CHARS = 255
DEFAULT_CONTENT_TYPE = "application/octet-stream"
CONTENT_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")

COLUMNS = (
    "id, channel_id, uploader_id, storage_key, filename, content_type, size, sha256, state,"
    " created_at"
)


def attachment_json(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "channel_id": row["channel_id"],
        "uploader_id": row["uploader_id"],
        "filename": row["filename"],
        "content_type": row["content_type"],
        "size": row["size"],
        "sha256": row["sha256"],
        "created_at": iso(row["created_at"]),
    }


def safe_filename(raw: str | None) -> str:
    """The client's file name as metadata only: last path component, no control or
    format characters (no bidi tricks), at most 255 characters; never used on disk."""
    if raw is None:
        return "file"
    check_storable(raw, "filename")
    name = re.split(r"[/\\]", raw)[-1]
    name = "".join(
        "_" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in name
    )
    name = name.strip().strip(".").strip()
    return name[:MAX_FILENAME_CHARS] or "file"


def safe_content_type(raw: str | None) -> str:
    if not raw:
        return DEFAULT_CONTENT_TYPE
    value = raw.split(";", 1)[0].strip().lower()
    return value if CONTENT_TYPE_RE.fullmatch(value) else DEFAULT_CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class Download:
    """An open descriptor of the file; the caller streams it and closes ``fd``."""

    fd: int
    size: int
    filename: str
    content_type: str


class AttachmentService:
    def __init__(
        self,
        *,
        db: Database,
        settings: Settings,
        metrics: Metrics,
        storage: Storage,
        files: FileDeletions,
        audit: AuditTrail,
        arq: ArqRedis | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.storage = storage
        self.files = files
        self.audit = audit
        self.arq = arq

    # -- upload ------------------------------------------------------------------------

    async def check_can_upload(self, user: User, channel_id: int) -> None:
        """404 unless the user may post in the channel (checked before reading bytes)."""
        async with self.db.connection() as tx:
            await visible_channel(tx, user, channel_id)

    async def upload(
        self,
        user: User,
        channel_id: int,
        *,
        filename: str | None,
        content_type: str | None,
        chunks: AsyncIterable[bytes],
    ) -> dict[str, Any]:
        """Stream to a temporary file (sha256 on the way, size capped), fsync, insert the
        row, rename into place, commit. Any failure leaves neither file nor row."""
        name = safe_filename(filename)
        ctype = safe_content_type(content_type)
        await self.check_can_upload(user, channel_id)
        try:
            temp = await self.storage.write_temp(chunks, self.settings.max_upload_bytes)
        except TooLarge:
            raise PayloadTooLarge(
                f"attachment is larger than {self.settings.max_upload_bytes} bytes"
            ) from None
        key = new_key()
        placed = False
        try:
            async with self.db.transaction() as tx:
                await visible_channel(tx, user, channel_id)
                # Held until COMMIT; the orphan scan try-locks the same key before removing
                # a file, so it never takes a file whose row is about to commit.
                await tx.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                    (AdvisoryLock.UPLOAD_KEY, key),
                )
                row = await tx.fetchrow(
                    "INSERT INTO attachments (channel_id, uploader_id, storage_key, filename,"
                    " content_type, size, sha256) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    f" RETURNING {COLUMNS}",
                    (channel_id, user.id, key, name, ctype, temp.size, temp.sha256),
                )
                assert row is not None
                await asyncio.to_thread(self.storage.place, temp.path, key)
                placed = True
        except BaseException:
            if placed:
                # The commit failed after the rename: take the file back out.
                await asyncio.to_thread(self._drop_placed, key)
            else:
                await asyncio.to_thread(self.storage.discard_temp, temp.path)
            raise
        self.metrics.attachment_uploads.inc()
        self.metrics.attachment_upload_bytes.inc(temp.size)
        logger.info("attachment %s stored (%d bytes) by user %s", row["id"], temp.size, user.id)
        return attachment_json(row)

    def _drop_placed(self, key: str) -> None:
        try:
            self.storage.unlink(key)
        except (OSError, PathRejected):
            logger.exception("could not remove the file of a failed upload; the orphan scan will")

    # -- reading -----------------------------------------------------------------------

    async def _visible(self, user: User, attachment_id: int) -> Row:
        async with self.db.connection() as tx:
            row = await tx.fetchrow(
                f"SELECT {COLUMNS} FROM attachments WHERE id = %s AND state = 'active'",
                (attachment_id,),
            )
            if row is None:
                raise NotFound("attachment not found", code="attachment_not_found")
            try:
                await visible_channel(tx, user, row["channel_id"])
            except NotFound:
                raise NotFound("attachment not found", code="attachment_not_found") from None
        return row

    async def get(self, user: User, attachment_id: int) -> dict[str, Any]:
        """Metadata of an attachment in a channel the user can see."""
        return attachment_json(await self._visible(user, attachment_id))

    async def open_content(
        self, user: User, attachment_id: int, *, client_ip: str | None = None
    ) -> Download:
        """An open file to stream; refuses (and audits) a path that is not safe to read."""
        row = await self._visible(user, attachment_id)
        try:
            fd, size = await self._open_read(row["storage_key"])
        except FileNotFoundError:
            raise NotFound("attachment file is missing", code="file_missing") from None
        except PathRejected as exc:
            await self.audit.record(
                file_deletions.path_rejected_entry(
                    self.metrics,
                    attachment_id,
                    exc,
                    {"operation": "download"},
                    actor_id=user.id,
                    client_ip=client_ip,
                )
            )
            raise Conflict(
                "the attachment's stored path is refused", code="path_rejected"
            ) from None
        return Download(fd, size, row["filename"], row["content_type"])

    async def _open_read(self, key: str) -> tuple[int, int]:
        """``Storage.open_read`` in a thread; if the caller is cancelled meanwhile, the
        descriptor the thread still opens is closed rather than leaked."""
        task = asyncio.ensure_future(asyncio.to_thread(self.storage.open_read, key))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_opened)
            raise

    # -- deletion ----------------------------------------------------------------------

    async def delete(self, user: User, attachment_id: int, *, client_ip: str | None = None) -> None:
        """Owner or admin; the row leaves the users' view and commits before the file is
        touched. Concurrent deletes: the row lock lets exactly one through."""
        error: Exception | None = None
        file_present = False
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                f"SELECT {COLUMNS} FROM attachments WHERE id = %s AND state = 'active' FOR UPDATE",
                (attachment_id,),
            )
            if row is None:
                raise NotFound("attachment not found", code="attachment_not_found")
            entry = audit.Entry(
                audit.ATTACHMENT_DELETE,
                "attachment",
                attachment_id,
                audit.OK,
                actor_id=user.id,
                details={"channel_id": row["channel_id"], "size": row["size"]},
                client_ip=client_ip,
            )
            if row["uploader_id"] != user.id and not user.is_admin:
                try:
                    await visible_channel(tx, user, row["channel_id"])
                    error = Forbidden("only the uploader or an admin may delete an attachment")
                except NotFound:
                    # Not even visible: answer as if it did not exist, but keep the record.
                    error = NotFound("attachment not found", code="attachment_not_found")
                await audit.append(
                    tx,
                    audit.Entry(
                        audit.ATTACHMENT_DELETE_DENIED,
                        "attachment",
                        attachment_id,
                        audit.DENIED,
                        actor_id=user.id,
                        details={"reason": "not_owner", "status": getattr(error, "status", 0)},
                        client_ip=client_ip,
                    ),
                )
            else:
                try:
                    file_present = await asyncio.to_thread(
                        self.storage.validate, row["storage_key"]
                    )
                except PathRejected as exc:
                    await self.files.mark_failed(tx, row, f"path rejected: {exc}")
                    await audit.append(
                        tx,
                        file_deletions.path_rejected_entry(
                            self.metrics,
                            attachment_id,
                            exc,
                            {"operation": "delete"},
                            actor_id=user.id,
                            client_ip=client_ip,
                        ),
                    )
                    error = Conflict(
                        "the attachment's stored path is refused; kept for an operator",
                        code="path_rejected",
                    )
                except OSError:
                    # Cannot even look (permissions, I/O): let the removal and its retries
                    # meet the error and record it.
                    file_present = True
                if error is None:
                    await tx.execute(
                        "UPDATE attachments SET state = %s, state_changed_at = now() WHERE id = %s",
                        ("deleting" if file_present else "deleted", attachment_id),
                    )
                    if not file_present:
                        entry = replace(entry, result=audit.MISSING)
                    await audit.append(tx, entry)
        if error is not None:
            self.metrics.attachment_deletes.labels(result=getattr(error, "code", "error")).inc()
            raise error
        self.metrics.attachment_deletes.labels(result="ok" if file_present else "missing").inc()
        if file_present:
            try:
                await self._remove_file(attachment_id)
            except Exception:
                # Committed already: the row stays 'deleting' and the sweep finishes it.
                logger.exception("attachment %s: first file removal attempt broke", attachment_id)

    async def _remove_file(self, attachment_id: int) -> None:
        """The first removal attempt, right after the commit; failures go to the worker."""
        backoff = file_deletions.DELETE_RETRY_BACKOFF_S
        outcome = await self.files.attempt(
            attachment_id,
            attempt=0,
            final=False,
            source=file_deletions.SOURCE_REQUEST,
            retry_in_s=backoff[0],
        )
        if outcome != file_deletions.RETRY:
            return
        if self.arq is None:
            logger.warning("attachment %s: no job queue; the sweep will retry", attachment_id)
            return
        try:
            await self.arq.enqueue_job(
                JOB_DELETE_ATTACHMENT_FILE,
                attachment_id,
                _defer_by=backoff[0],
                _queue_name=QUEUE_NAME,
            )
        except Exception:
            # The row stays 'deleting'; retry_attachment_deletions takes stale ones over.
            logger.exception("attachment %s: could not enqueue the retry", attachment_id)

    # -- operators ---------------------------------------------------------------------

    async def health_summary(self) -> dict[str, Any]:
        """Counts for /health → attachments (no paths, no addresses)."""
        row = await self.db.fetchrow(
            "SELECT"
            " (SELECT count(*) FROM audit_log WHERE action = %s) AS delete_failures_total,"
            " (SELECT count(*) FROM attachments WHERE state = 'deleting') AS pending,"
            " (SELECT count(*) FROM attachments WHERE state = 'delete_failed') AS failed",
            (audit.ATTACHMENT_FILE_DELETE_FAILED,),
        )
        assert row is not None
        last = await self.db.fetchrow(
            "SELECT at, result, details FROM audit_log WHERE action = %s ORDER BY id DESC LIMIT 1",
            (audit.ORPHAN_SCAN,),
        )
        last_scan = None
        if last is not None:
            last_scan = {
                "at": iso(last["at"].astimezone(UTC)),
                "result": last["result"],
                **last["details"],
            }
        return {
            "delete_failures_total": row["delete_failures_total"],
            "pending_file_deletions": row["pending"],
            "delete_failed_records": row["failed"],
            "last_orphan_scan": last_scan,
        }


def _close_opened(task: asyncio.Future[tuple[int, int]]) -> None:
    if not task.cancelled() and task.exception() is None:
        os.close(task.result()[0])
