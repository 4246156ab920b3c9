"""The ``herald`` command: serve, worker, migrate, users, tokens, jobs, audit, ``--version``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shared.entry import fail, run_command
from shared.settings import Settings


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import dataclasses

    from server.runner import serve_command

    if args.processes is not None:
        settings = dataclasses.replace(settings, processes=args.processes)
    return serve_command(settings)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.app import worker_command

    return worker_command(settings, check=args.check)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from shared.db.migrate import migrate
    from shared.db.pool import Database, create_pool

    async def run() -> list[str]:
        db = Database(await create_pool(settings.database_url, maxsize=1))
        try:
            return await migrate(db)
        finally:
            await db.close()

    applied = asyncio.run(run())
    print(f"applied: {', '.join(applied)}" if applied else "database is up to date")
    return 0


def cmd_users_create(settings: Settings, args: argparse.Namespace) -> int:
    from shared.db.pool import Database, create_pool
    from shared.services.users import UserService

    async def run() -> tuple[int, str]:
        db = Database(await create_pool(settings.database_url, maxsize=1))
        try:
            user, token = await UserService(db=db).create(args.name, is_admin=args.admin)
            return user.id, token
        finally:
            await db.close()

    user_id, token = asyncio.run(run())
    print(f"id: {user_id}")
    print(f"token: {token}")
    return 0


def token_days(raw: str) -> int:
    """argparse type for --expires-in: whole days, 1 to MAX_EXPIRES_DAYS (else exit 2)."""
    import re

    from shared.services.users import MAX_EXPIRES_DAYS, shown

    text = raw.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text, re.ASCII):
        raise argparse.ArgumentTypeError(f"not a whole number of days: {shown(raw, 20)}")
    # No int() of a huge digit string: a length check says "out of range" first.
    if len(text.lstrip("+-")) > 6 or not 1 <= int(text) <= MAX_EXPIRES_DAYS:
        raise argparse.ArgumentTypeError(
            f"must be 1-{MAX_EXPIRES_DAYS} days, got {shown(text, 20)}"
        )
    return int(text)


def token_id(raw: str) -> int:
    """argparse type for TOKEN_ID: a positive id PostgreSQL can hold (else exit 2)."""
    from shared.services.users import shown

    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19 or not 0 < int(text) < 2**63:
        raise argparse.ArgumentTypeError(f"not a token id: {shown(raw, 20)}")
    return int(text)


def when(ts: Any) -> str:
    from shared.models import iso

    return iso(ts.replace(microsecond=0)) or "-"


def cmd_tokens_create(settings: Settings, args: argparse.Namespace) -> int:
    """A new token for an existing user, printed once."""
    from shared.db.pool import Database, create_pool
    from shared.services.users import UserService

    async def run() -> tuple[Any, str]:
        db = Database(await create_pool(settings.database_url, maxsize=1))
        try:
            users = UserService(db=db)
            user = await users.by_name(args.name)
            return await users.create_token(user, expires_in_days=args.expires_in, label=args.label)
        finally:
            await db.close()

    info, token = asyncio.run(run())
    print(f"id: {info.id}")
    print(f"token: {token}")  # two lines, as `users create` prints: `tokens list` has the rest
    return 0


def cmd_tokens_list(settings: Settings, args: argparse.Namespace) -> int:
    """A user's tokens, one per line: never the token or its hash."""
    from datetime import UTC, datetime

    from shared.db.pool import Database, create_pool
    from shared.services.users import UserService

    async def run() -> Any:
        db = Database(await create_pool(settings.database_url, maxsize=1))
        try:
            return await UserService(db=db).list_tokens(args.name)
        finally:
            await db.close()

    _user, tokens = asyncio.run(run())
    now = datetime.now(UTC)
    rows = [("ID", "STATUS", "CREATED", "LAST USED", "EXPIRES", "REVOKED", "LABEL")]
    for t in tokens:
        rows.append(
            (
                str(t.id),
                t.status(now),
                when(t.created_at),
                when(t.last_used_at) if t.last_used_at else "never",
                when(t.expires_at) if t.expires_at else "never",
                when(t.revoked_at) if t.revoked_at else "-",
                t.label if t.label is not None else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_tokens_revoke(settings: Settings, args: argparse.Namespace) -> int:
    """Revoke a token: refused by every server within 2 s, its open streams closed."""
    import redis.asyncio as aioredis

    from shared.bus import EventBus, redis_client
    from shared.cache import MetadataCache
    from shared.db.pool import Database, create_pool
    from shared.metrics import Metrics
    from shared.services.users import UserService

    async def reachable(client: aioredis.Redis) -> bool:
        try:
            async with asyncio.timeout(2):
                await client.ping()
        except Exception:
            return False
        return True

    async def run() -> tuple[Any, bool, bool]:
        db = Database(await create_pool(settings.database_url, maxsize=1))
        client = redis_client(settings)
        try:
            # Redis is the fast path only (the servers find the revoke in PostgreSQL
            # within 2 s by themselves): an unreachable one is skipped, not waited for.
            up = await reachable(client)
            cache = MetadataCache(redis=client, settings=settings, metrics=Metrics.null())
            users = UserService(
                db=db,
                cache=cache if up else None,
                bus=EventBus(client, settings) if up else None,
            )
            info, changed = await users.revoke_token(args.token_id)
            return info, changed, up
        finally:
            await client.aclose()
            await db.close()

    info, changed, notified = asyncio.run(run())
    if changed:
        print(f"revoked: token {info.id}")
    else:
        print(f"already revoked: token {info.id} (at {when(info.revoked_at)})")
    if not notified:
        print("note: Redis unreachable; servers refuse the token within 2 s all the same")
    return 0


def cmd_audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 if the audit chain is intact, 1 naming the first bad row."""
    from shared.db.pool import Database, create_pool
    from shared.services.audit import AuditTrail

    async def run() -> Any:
        db = Database(await create_pool(settings.database_url, maxsize=1))
        try:
            return await AuditTrail(db=db).verify()
        finally:
            await db.close()

    result = asyncio.run(run())
    if result.ok:
        print(f"audit trail ok: {result.rows} rows")
        print(f"head: id {result.head_id} hash {result.head_hash}")
        return 0
    print(f"audit trail BROKEN at row {result.bad_id}: {result.reason}")
    print(f"last good row: id {result.head_id} hash {result.head_hash} ({result.rows} rows ok)")
    return 1


def job_name(value: str) -> str:
    """argparse type for JOB: an operator job name, else exit 2 naming the known ones."""
    from shared.constants import OPERATOR_JOBS

    if value not in OPERATOR_JOBS:
        known = ", ".join(sorted(OPERATOR_JOBS))
        raise argparse.ArgumentTypeError(f"unknown job {value!r} (known jobs: {known})")
    return value


def print_job_state(state: Any) -> None:
    import json

    print(f"job_id: {state.job_id}")
    print(f"status: {state.status}")
    for label in ("function", "enqueued_at", "started_at", "finished_at", "error"):
        value = getattr(state, label)
        if value is not None:
            print(f"{label}: {value}")
    if state.done:
        print(f"success: {'true' if state.ok else 'false'}")
    if state.result is not None:
        print(f"result: {json.dumps(state.result, default=str, sort_keys=True)}")


def print_progress(figures: dict[str, Any]) -> None:
    """One status line, rewritten in place: ``phase: files, scanned: 12000, …``."""
    text = ", ".join(f"{key}: {value}" for key, value in figures.items())
    sys.stderr.write(f"\r\x1b[Kprogress: {text[:200]}")
    sys.stderr.flush()


def cmd_jobs_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    """Queue an operator job (joining a real run already queued or running); with
    ``--wait``, exit 0 only if it finished and succeeded."""
    from shared.bus import arq_pool, close_redis
    from shared.services.jobs import JobService

    # Progress goes to a terminal only: a script reading stdout gets the same lines as
    # before, and a log file no carriage-return litter.
    show_progress = args.wait and sys.stderr.isatty()

    async def run() -> tuple[bool, Any]:
        pool = await arq_pool(settings)
        try:
            jobs = JobService(arq=pool)
            job_id, joined = await jobs.enqueue(args.job, dry_run=args.dry_run)
            if args.wait:
                on_progress = print_progress if show_progress else None
                return joined, await jobs.wait(
                    job_id, max_wait_s=args.timeout, on_progress=on_progress
                )
            return joined, await jobs.state(job_id)
        finally:
            await close_redis(pool)

    joined, state = asyncio.run(run())
    if show_progress:
        sys.stderr.write("\n")
    if joined:
        print("joined: a run of this job was already queued or running")
    print_job_state(state)
    if not args.wait:
        return 0
    if not state.done:
        return fail(
            f"job {state.job_id} still {state.status} after {args.timeout:g} s;"
            f" check later with: herald jobs status {state.job_id}"
        )
    return 0 if state.ok else 1


def cmd_jobs_status(settings: Settings, args: argparse.Namespace) -> int:
    """Print a job's state and result; exit 1 if no such job is known (any more)."""
    from shared.bus import arq_pool, close_redis
    from shared.services.jobs import JobService

    async def run() -> Any:
        pool = await arq_pool(settings)
        try:
            return await JobService(arq=pool).state(args.job_id)
        finally:
            await close_redis(pool)

    state = asyncio.run(run())
    print_job_state(state)
    return 1 if state.status == "not_found" else 0


def cmd_jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    """Running and queued jobs, then the newest finished ones (results are kept 1 h)."""
    from shared.bus import arq_pool
    from shared.services.jobs import JobService

    async def run() -> Any:
        pool = await arq_pool(settings)
        try:
            return await JobService(arq=pool).listing(limit=args.limit, include_routine=args.all)
        finally:
            await pool.aclose()

    listing = asyncio.run(run())
    print(f"running or queued: {len(listing.active)}")
    for state in listing.active:
        print(f"  {state.status:<11} {state.job_id}  {state.function or '-'}"
              f"  enqueued {state.enqueued_at or '-'}")  # fmt: skip
    hidden = f" ({listing.hidden} routine not shown; --all shows them)" if listing.hidden else ""
    print(f"finished (newest first): {len(listing.finished)}{hidden}")
    for state in listing.finished:
        outcome = "ok" if state.ok else "failed"
        print(f"  {outcome:<11} {state.job_id}  {state.function or '-'}"
              f"  finished {state.finished_at or '-'}")  # fmt: skip
    return 0


def list_limit(raw: str) -> int:
    """argparse type for --limit: 1-1000."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be 1-1000, got {raw!r}")
    return value


def cmd_smoke(settings: Settings, args: argparse.Namespace) -> int:
    """Check a running deployment end to end; exit 1 naming the step that failed."""
    from herald.smoke import run_smoke

    return run_smoke(args.url, args.token)


def http_url(value: str) -> str:
    """argparse type for --url: an http(s) URL with a host."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {value!r}")
    return value


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "smoke": cmd_smoke,
    "serve": cmd_serve,
    "worker": cmd_worker,
    "migrate": cmd_migrate,
    "users.create": cmd_users_create,
    "tokens.create": cmd_tokens_create,
    "tokens.list": cmd_tokens_list,
    "tokens.revoke": cmd_tokens_revoke,
    "jobs.enqueue": cmd_jobs_enqueue,
    "jobs.status": cmd_jobs_status,
    "jobs.list": cmd_jobs_list,
    "audit.verify": cmd_audit_verify,
}


def process_count(raw: str) -> int:
    """argparse type for --processes: 0-256, or ``auto`` (0: one per CPU core)."""
    from shared.settings import MAX_PROCESSES

    if raw.strip().lower() == "auto":
        return 0
    if not raw.strip().isdigit() or int(raw) > MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"expected 0-{MAX_PROCESSES} or auto, got {raw!r}")
    return int(raw)


def wait_seconds(raw: str) -> float:
    """A finite number of seconds, 0-86400 (argparse turns the error into exit 2)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 0 <= value <= 86_400:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must be 0-86400 seconds, got {raw!r}")
    return value


DESCRIPTION = (
    "Herald, a self-hosted real-time messaging backend: run its server and worker,"
    " migrate its database, manage users and their API tokens, queue operators' jobs,"
    " verify the audit trail."
    " Settings come from the environment and an optional .env (docs/configuration.md)."
)


def add_command(
    sub: Any, name: str, summary: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` opens with a description, not just a usage line."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=description or summary[0].upper() + summary[1:] + "."
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    from shared.metrics import herald_version

    parser = argparse.ArgumentParser(prog="herald", description=DESCRIPTION)
    parser.add_argument(
        "--version",
        action="version",
        version=f"herald {herald_version()}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = add_command(
        sub,
        "serve",
        "run the HTTP/SSE server",
        "Run the HTTP API and event streams on HERALD_HOST:HERALD_PORT until SIGTERM or"
        " SIGINT, then drain open streams for up to HERALD_SHUTDOWN_TIMEOUT_S and exit 0.",
    )
    serve.add_argument(
        "--processes",
        type=process_count,
        default=None,
        metavar="N",
        help="server processes sharing the port (SO_REUSEPORT); 0 or auto: one per CPU"
        " core (default: HERALD_PROCESSES, else 1)",
    )
    worker = add_command(
        sub,
        "worker",
        "run the arq worker daemon",
        "Run the background worker: delayed-message delivery and cleanup, attachment file"
        " deletions, the orphan scan; its own /metrics and /health on"
        " HERALD_WORKER_METRICS_PORT. Exits 0 on SIGTERM/SIGINT.",
    )
    worker.add_argument(
        "--check",
        action="store_true",
        help="do not run: exit 0 if some worker's health-check key is fresh, else 1",
    )
    add_command(
        sub,
        "migrate",
        "apply database migrations",
        "Apply the pending SQL migrations to DATABASE_URL; safe to run again (idempotent).",
    )
    users = add_command(sub, "users", "manage users").add_subparsers(
        dest="users_command", required=True, metavar="SUBCOMMAND"
    )
    create = add_command(
        users,
        "create",
        "create a user and print its token",
        "Create a user with a first API token; prints 'id: N' (the user's) and 'token: T'."
        " The token is shown only this once; more with 'herald tokens create'.",
    )
    create.add_argument("name", metavar="NAME", help="the user's name (1-80 printable characters)")
    create.add_argument("--admin", action="store_true", help="make the user an administrator")
    tokens = add_command(
        sub,
        "tokens",
        "manage users' API tokens",
        "Create, list and revoke API tokens. A user may hold several; a revoked or"
        " expired token is refused by every server within 2 s and its open streams get"
        " 'close' (revoked).",
    ).add_subparsers(dest="tokens_command", required=True, metavar="SUBCOMMAND")
    tcreate = add_command(
        tokens,
        "create",
        "create another token for a user and print it",
        "Create an API token for the user NAME; prints 'id: N' (the token's, for revoke)"
        " and 'token: T', one per line. The token is shown only this once. Exit 1 if there"
        " is no such user.",
    )
    tcreate.add_argument("name", metavar="NAME", help="the user's name")
    tcreate.add_argument(
        "--expires-in",
        metavar="DAYS",
        type=token_days,
        default=None,
        help="the token stops working after DAYS days (1-3650); default: never",
    )
    tcreate.add_argument(
        "--label", default=None, help="a note shown by 'tokens list' (1-80 printable characters)"
    )
    tlist = add_command(
        tokens,
        "list",
        "list a user's tokens",
        "List the user NAME's tokens: id, status (active, expired, revoked), creation, last"
        " use (recorded at most once a minute), expiry, revocation and label. Never the"
        " token itself. Exit 1 if there is no such user.",
    )
    tlist.add_argument("name", metavar="NAME", help="the user's name")
    trevoke = add_command(
        tokens,
        "revoke",
        "revoke a token",
        "Revoke the token TOKEN_ID (see 'tokens list'): every server refuses it within 2 s"
        " and closes its open streams. Revoking it again changes nothing. Exit 1 if there is"
        " no such token.",
    )
    trevoke.add_argument(
        "token_id", metavar="TOKEN_ID", type=token_id, help="the token's id (from 'tokens list')"
    )
    jobs = add_command(
        sub,
        "jobs",
        "operators' ad-hoc worker jobs",
        "Queue a worker job by hand, or look up a job's state and result.",
    ).add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    enqueue = add_command(
        jobs,
        "enqueue",
        "queue a job for the worker",
        "Queue an operator job for the worker (joining a real run already queued or"
        " running); with --wait, exit 0 only if it finished and succeeded.",
    )
    enqueue.add_argument(
        "job",
        metavar="JOB",
        type=job_name,
        help="cleanup-delayed-messages, orphan-scan or retry-attachment-deletions",
    )
    enqueue.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    enqueue.add_argument(
        "--wait",
        action="store_true",
        help="wait for the result (on a terminal, shows how far a long job is)",
    )
    enqueue.add_argument(
        "--timeout", type=wait_seconds, default=600.0, help="seconds --wait waits (default 600)"
    )
    status = add_command(
        jobs,
        "status",
        "a job's state and result",
        "Print a job's state and result; exit 1 if the id is unknown or its result expired.",
    )
    status.add_argument("job_id", metavar="JOB_ID", help="the job_id that enqueue printed")
    listing = add_command(
        jobs,
        "list",
        "running, queued and recently finished jobs",
        "Print the jobs running or queued now, then the newest finished ones (the worker"
        " keeps results for an hour). Routine runs (delayed-message delivery ticks, queue"
        " samples) are counted but not shown unless --all.",
    )
    listing.add_argument(
        "--limit", type=list_limit, default=20, help="finished jobs to show, 1-1000 (default 20)"
    )
    listing.add_argument("--all", action="store_true", help="show routine runs too")
    audit = add_command(sub, "audit", "the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="SUBCOMMAND"
    )
    add_command(
        audit,
        "verify",
        "check the audit trail's hash chain (exit 1 on a break)",
        "Recompute the audit trail's hash chain; exit 0 if intact, 1 naming the first bad row.",
    )
    smoke = add_command(
        sub,
        "smoke",
        "check a running deployment end to end",
        "Health, auth, a post received over a stream and a delayed message delivered by"
        " the worker, against a running deployment; exit 0, or 1 naming the step that"
        " failed. Creates and deletes a private channel named smoke-….",
    )
    smoke.add_argument("--url", required=True, type=http_url, help="e.g. http://127.0.0.1:8080")
    smoke.add_argument("--token", required=True, help="an API token of any user")
    return parser


def command_key(args: argparse.Namespace) -> str:
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command}.{sub}" if sub else str(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS[command_key(args)]
    return run_command(lambda settings: handler(settings, args))


if __name__ == "__main__":
    sys.exit(main())
