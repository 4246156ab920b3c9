"""The ``herald`` command: serve, worker, migrate, users, jobs, audit (and ``--version``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shared.entry import fail, run_command
from shared.settings import Settings


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from server.runner import serve_command

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


def cmd_jobs_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    """Queue an operator job (joining a real run already queued or running); with
    ``--wait``, exit 0 only if it finished and succeeded."""
    from shared.bus import arq_pool, close_redis
    from shared.services.jobs import JobService

    async def run() -> tuple[bool, Any]:
        pool = await arq_pool(settings)
        try:
            jobs = JobService(arq=pool)
            job_id, joined = await jobs.enqueue(args.job, dry_run=args.dry_run)
            if args.wait:
                return joined, await jobs.wait(job_id, max_wait_s=args.timeout)
            return joined, await jobs.state(job_id)
        finally:
            await close_redis(pool)

    joined, state = asyncio.run(run())
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
    "jobs.enqueue": cmd_jobs_enqueue,
    "jobs.status": cmd_jobs_status,
    "audit.verify": cmd_audit_verify,
}


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
    " migrate its database, manage users, queue operators' jobs, verify the audit trail."
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
    add_command(
        sub,
        "serve",
        "run the HTTP/SSE server",
        "Run the HTTP API and event streams on HERALD_HOST:HERALD_PORT until SIGTERM or"
        " SIGINT, then drain open streams for up to HERALD_SHUTDOWN_TIMEOUT_S and exit 0.",
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
        "Create a user; prints 'id: N' and 'token: T'. The token is shown only this once.",
    )
    create.add_argument("name", metavar="NAME", help="the user's name (1-80 printable characters)")
    create.add_argument("--admin", action="store_true", help="make the user an administrator")
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
    enqueue.add_argument("--wait", action="store_true", help="wait for the result")
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
