"""Every service built from its resources: the one place that constructs them.

Services take their collaborators as keyword arguments and build none themselves; the
server (``services_ctx``) and the worker (``open_context``) both call
:func:`build_services`, so the two processes wire them the same way. Each collaborator
is built once here and shared (one ``Storage``, one ``AuditTrail``), and nothing here
does I/O: the resources passed in are already open, and their owners close them.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from arq.connections import ArqRedis

from shared.breaker import CircuitBreaker
from shared.bus import EventBus
from shared.cache import MetadataCache
from shared.db.pool import Database
from shared.enforcement import Enforcement
from shared.metrics import Metrics
from shared.services.attachments.deletions import FileDeletions
from shared.services.attachments.orphans import OrphanScanner
from shared.services.attachments.service import AttachmentService
from shared.services.attachments.storage import Storage
from shared.services.audit import AuditTrail
from shared.services.channels import ChannelService
from shared.services.delayed.cleanup import CleanupService
from shared.services.delayed.delivery import DeliveryService
from shared.services.delayed.queue_stats import QueueStats
from shared.services.delayed.scheduling import DelayedMessageService
from shared.services.jobs import JobService
from shared.services.messages import MessageService
from shared.services.users import UserService
from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class AttachmentFiles:
    """The attachment services that need only the database and the upload directory."""

    storage: Storage
    deletions: FileDeletions
    orphans: OrphanScanner


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers and the jobs call; each process uses the part it needs."""

    cache: MetadataCache
    audit: AuditTrail
    users: UserService
    channels: ChannelService
    messages: MessageService
    queue_stats: QueueStats
    delayed: DelayedMessageService
    delivery: DeliveryService
    cleanup: CleanupService
    jobs: JobService
    storage: Storage
    file_deletions: FileDeletions
    attachments: AttachmentService
    orphans: OrphanScanner


def attachment_files(
    *,
    db: Database,
    settings: Settings,
    metrics: Metrics,
    audit: AuditTrail,
    enforcement: Enforcement | None = None,
) -> AttachmentFiles:
    """One ``Storage`` over the upload directory, with the file deletions and the orphan
    scan that work on it (also on their own: an operator's scan, a test, the bench)."""
    storage = Storage(settings.upload_dir)
    deletions = FileDeletions(db=db, storage=storage, metrics=metrics)
    orphans = OrphanScanner(
        db=db,
        settings=settings,
        metrics=metrics,
        storage=storage,
        files=deletions,
        audit=audit,
        enforcement=enforcement or Enforcement(settings.observe_only, metrics),
    )
    return AttachmentFiles(storage=storage, deletions=deletions, orphans=orphans)


def build_services(
    *,
    settings: Settings,
    db: Database,
    redis: aioredis.Redis,
    arq: ArqRedis,
    bus: EventBus,
    metrics: Metrics,
    breaker: CircuitBreaker | None = None,
) -> Services:
    """Every service, wired from the process's open resources; ``breaker`` is the
    process's Redis breaker (the bus's unless given), shared by the cache."""
    cache = MetadataCache(
        redis=redis, settings=settings, metrics=metrics, breaker=breaker or bus.breaker
    )
    audit = AuditTrail(db=db)
    stats = QueueStats(db=db, redis=redis, settings=settings, metrics=metrics)
    # One per process: the observe-only log lines are throttled per rule across services.
    enforcement = Enforcement(settings.observe_only, metrics)
    files = attachment_files(
        db=db, settings=settings, metrics=metrics, audit=audit, enforcement=enforcement
    )
    return Services(
        cache=cache,
        audit=audit,
        users=UserService(db=db, cache=cache, bus=bus),
        channels=ChannelService(db=db, bus=bus, cache=cache),
        messages=MessageService(db=db, bus=bus, metrics=metrics),
        queue_stats=stats,
        delayed=DelayedMessageService(
            db=db, arq=arq, settings=settings, metrics=metrics, stats=stats, enforcement=enforcement
        ),
        delivery=DeliveryService(db=db, bus=bus, settings=settings, metrics=metrics),
        cleanup=CleanupService(
            db=db, retention_s=settings.queue_retention_s, batch_size=settings.cleanup_batch
        ),
        jobs=JobService(arq=arq),
        storage=files.storage,
        file_deletions=files.deletions,
        attachments=AttachmentService(
            db=db,
            settings=settings,
            metrics=metrics,
            storage=files.storage,
            files=files.deletions,
            audit=audit,
            arq=arq,
        ),
        orphans=files.orphans,
    )
