"""The ``herald`` command: serve, worker, migrate, users, jobs, audit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from shared.settings import Settings, SettingsError

EXIT_USAGE = 2


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def fail(message: str, code: int = 1) -> int:
    print(f"herald: {message}", file=sys.stderr)
    return code


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from server.runner import serve

    configure_logging()
    serve(settings)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.app import check, run_worker

    if args.check:
        ok = asyncio.run(check(settings))
        print("worker: healthy" if ok else "worker: no fresh health-check key")
        return 0 if ok else 1
    configure_logging()
    asyncio.run(run_worker(settings))
    return 0


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


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "worker": cmd_worker,
    "migrate": cmd_migrate,
    "users.create": cmd_users_create,
}


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
    return parser


def command_key(args: argparse.Namespace) -> str:
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command}.{sub}" if sub else str(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        return fail(f"configuration error: {exc}", EXIT_USAGE)
    handler = COMMANDS[command_key(args)]
    try:
        return handler(settings, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from shared.errors import HeraldError

        if isinstance(exc, HeraldError):
            return fail(exc.message)
        return fail(describe(exc))


if __name__ == "__main__":
    sys.exit(main())
