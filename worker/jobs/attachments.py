"""Attachment jobs: file-removal retries with backoff, the retry sweep, the orphan scan."""

from __future__ import annotations

import logging
from typing import Any

from arq import Retry, func
from arq.cron import CronJob, cron
from arq.worker import Function

from shared.constants import (
    JOB_DELETE_ATTACHMENT_FILE,
    JOB_ORPHAN_SCAN,
    JOB_RETRY_ATTACHMENT_DELETIONS,
)
from shared.services.attachments import deletions as file_deletions
from shared.services.jobs import JobProgress
from worker.context import herald

logger = logging.getLogger(__name__)

# The daily scan runs at a quiet hour (UTC); a cron tick is unique across workers.
ORPHAN_SCAN_HOUR = 3
ORPHAN_SCAN_MINUTE = 17


async def delete_attachment_file(
    ctx: dict[str, Any], attachment_id: int, dry_run: bool = False
) -> str:
    """Retry removing the file of a row the server already marked ``deleting``.

    Try n runs ``DELETE_RETRY_BACKOFF_S[n-1]`` after the previous failure; a failure on
    the last try marks the row ``delete_failed`` with the error. Each try is audited."""
    backoff = file_deletions.DELETE_RETRY_BACKOFF_S
    job_try = int(ctx.get("job_try", 1))
    if dry_run:
        return "dry_run"
    final = job_try >= len(backoff)
    retry_in = None if final else backoff[job_try]
    outcome = await herald(ctx).services.file_deletions.attempt(
        attachment_id,
        attempt=job_try,
        final=final,
        source=file_deletions.SOURCE_WORKER,
        retry_in_s=retry_in,
    )
    if outcome == file_deletions.RETRY:
        assert retry_in is not None
        raise Retry(defer=retry_in)
    return outcome


async def retry_attachment_deletions(ctx: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    """Operators' job: one more try for every ``delete_failed`` row (and ``deleting``
    rows whose retry job was lost); ``dry_run`` only counts them."""
    summary = await herald(ctx).services.file_deletions.sweep(dry_run=dry_run)
    result = {**summary.to_json(), "dry_run": dry_run}
    logger.info("attachment deletion sweep: %s", result)
    return result


async def orphan_scan(ctx: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    """The orphan scan (daily cron and operators' job); ``dry_run`` only reports.
    Reports how far it is under the job's progress key (``herald jobs enqueue --wait``)."""
    wctx = herald(ctx)
    progress = JobProgress(wctx.arq, str(ctx["job_id"]))
    return await wctx.services.orphans.scan(dry_run=dry_run, progress=progress)


def attachment_functions() -> list[Function]:
    return [
        # arq counts the first run as try 1: one try per backoff step, no more.
        func(
            delete_attachment_file,
            name=JOB_DELETE_ATTACHMENT_FILE,
            max_tries=len(file_deletions.DELETE_RETRY_BACKOFF_S),
        ),
        func(retry_attachment_deletions, name=JOB_RETRY_ATTACHMENT_DELETIONS, max_tries=1),
        func(orphan_scan, name=JOB_ORPHAN_SCAN, max_tries=1, timeout=3600),
    ]


def attachment_cron_jobs() -> list[CronJob]:
    return [
        cron(
            orphan_scan,
            name=f"cron:{JOB_ORPHAN_SCAN}",
            hour={ORPHAN_SCAN_HOUR},
            minute={ORPHAN_SCAN_MINUTE},
            run_at_startup=False,
            timeout=3600,
        )
    ]
