"""The ``herald`` command: serve, worker, migrate, users, jobs, audit."""

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
    from shared.bus import arq_pool
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
            await pool.aclose()

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
    from shared.bus import arq_pool
    from shared.services.jobs import JobService

    async def run() -> Any:
        pool = await arq_pool(settings)
        try:
            return await JobService(arq=pool).state(args.job_id)
        finally:
            await pool.aclose()

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herald", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP/SSE server")
    worker = sub.add_parser("worker", help="run the arq worker daemon")
    worker.add_argument("--check", action="store_true", help="exit 0 if a worker is alive")
    sub.add_parser("migrate", help="apply database migrations")
    users = sub.add_parser("users", help="manage users").add_subparsers(
        dest="users_command", required=True
    )
    create = users.add_parser("create", help="create a user and print its token")
    create.add_argument("name")
    create.add_argument("--admin", action="store_true")
    jobs = sub.add_parser("jobs", help="operators' ad-hoc worker jobs").add_subparsers(
        dest="jobs_command", required=True
    )
    enqueue = jobs.add_parser("enqueue", help="queue a job for the worker")
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
    status = jobs.add_parser("status", help="a job's state and result")
    status.add_argument("job_id", metavar="JOB_ID")
    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True
    )
    audit.add_parser("verify", help="check the audit trail's hash chain (exit 1 on a break)")
    smoke = sub.add_parser(
        "smoke",
        help="check a running deployment end to end",
        description="Health, auth, a post received over a stream and a delayed message"
        " delivered by the worker, against a running deployment; exit 0, or 1 naming the"
        " step that failed. Creates and deletes a private channel named smoke-….",
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
