"""``herald serve --processes N``: a parent supervising N server processes on one port.

Why processes: one Python process uses one core; fan-out and the HTTP parser are CPU
work, so a second core needs a second interpreter. Each child is an ordinary
``python -m server`` that binds the same host and port with ``SO_REUSEPORT``: the kernel
spreads new connections over the children's listening sockets, and nothing is passed
between them. Everything the processes must agree on is already shared through Redis
and PostgreSQL: every message reaches every process's streams through the Redis events
channel (and the feeds' PostgreSQL reads), the per-IP stream leases are Redis keys.
What stays per process: ``HERALD_SSE_MAX_CONNECTIONS`` and the connection cap, and what
``/health`` and ``/metrics`` report (each answer names its ``process``).

The parent holds a bound, not listening, ``SO_REUSEPORT`` socket on the port for its
whole life: with ``HERALD_PORT=0`` it picks the port every child then takes, and the port
stays reserved while a child restarts. Children report ``READY=1`` (and watchdog pings,
when systemd asks for them) to the parent over systemd's notify protocol on a private
socket; the parent tells systemd ``READY=1`` once every child is ready. SIGTERM/SIGINT
is forwarded to every child, each drains as one process would (server/runner.py), a
second signal is forwarded too (streams dropped); the parent exits 0 when all children
exited 0. A child that dies after start-up is restarted, 0.5 s after its death doubling
to 30 s while it keeps dying young; one that dies during start-up stops the rest and the
parent exits 1, as a single process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from shared.sdnotify import Notifier
from shared.settings import Settings, supervised_child_env

logger = logging.getLogger(__name__)

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
# A child that lived this long before dying starts the backoff over.
STABLE_S = 30.0
# Beyond the drain window, how long children get before they are killed.
STOP_GRACE_S = 10.0
CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass
class Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    last_ping: float = 0.0
    quick_deaths: int = 0
    waiter: asyncio.Task[None] | None = field(default=None, repr=False)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket on ``host:port`` (OSError if taken)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.process_count
        self.children = [Child(i) for i in range(self.count)]
        self.notifier = Notifier.from_settings(settings)
        self.port = 0
        self.stopping = False
        self.all_ready = asyncio.Event()
        self.failed = asyncio.Event()
        self.address = b"\0herald-supervisor-%d-%s" % (os.getpid(), secrets.token_hex(4).encode())
        self.inbox: socket.socket | None = None

    # -- children's notify messages ---------------------------------------------------------

    def open_inbox(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # The kernel attaches each sender's pid: that is how a message names its child.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(self.address)
        sock.setblocking(False)
        self.inbox = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self.on_message)

    def on_message(self) -> None:
        assert self.inbox is not None
        while True:
            try:
                data, ancillary, _flags, _addr = self.inbox.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            pid = 0
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = CREDENTIALS.unpack_from(value)[0]
            child = next((c for c in self.children if c.proc and c.proc.pid == pid), None)
            if child is None:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            child.last_ping = time.monotonic()
            if fields.get("READY") == "1" and not child.ready:
                child.ready = True
                logger.info("server process %d (pid %d) ready", child.index, pid)
                if all(c.ready for c in self.children) and not self.all_ready.is_set():
                    self.all_ready.set()

    # -- starting and watching children -------------------------------------------------------

    async def spawn(self, child: Child) -> None:
        env = supervised_child_env(
            index=child.index,
            port=self.port,
            notify_socket="@" + self.address[1:].decode(),
            watchdog_usec=self.settings.watchdog_usec,
        )
        child.ready = False
        child.started_at = child.last_ping = time.monotonic()
        child.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "server", env=env)
        child.waiter = asyncio.create_task(self.watch(child), name=f"server-process-{child.index}")
        logger.info("server process %d started (pid %d)", child.index, child.proc.pid)

    async def watch(self, child: Child) -> None:
        assert child.proc is not None
        code = await child.proc.wait()
        if self.stopping:
            return
        lived = time.monotonic() - child.started_at
        if not self.all_ready.is_set():
            logger.error(
                "server process %d (pid %d) exited with %s during start-up",
                child.index,
                child.proc.pid,
                code,
            )
            self.failed.set()
            return
        child.quick_deaths = 0 if lived >= STABLE_S else child.quick_deaths + 1
        delay = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** max(0, child.quick_deaths - 1))
        logger.error(
            "server process %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
            child.index,
            child.proc.pid,
            code,
            lived,
            delay,
        )
        await asyncio.sleep(delay)
        if not self.stopping:
            await self.spawn(child)

    async def watchdog(self) -> None:
        """A child that stopped pinging (a stalled loop) is killed, and so restarted."""
        usec = self.settings.watchdog_usec
        if not usec:
            return
        while True:
            await asyncio.sleep(usec / 2_000_000)
            now = time.monotonic()
            for child in self.children:
                proc = child.proc
                silent = now - child.last_ping > usec / 1_000_000
                if child.ready and proc and proc.returncode is None and silent:
                    logger.error(
                        "server process %d (pid %d) missed its watchdog: killing it",
                        child.index,
                        proc.pid,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()

    # -- stopping ----------------------------------------------------------------------------

    def signal_children(self, signum: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.stopping:
            logger.info("%s: draining %d server processes", name, self.count)
            self.notifier.stopping("draining streams")
            self.stopping = True
        else:
            logger.warning("second %s: forwarded, children drop their streams", name)
        self.signal_children(signum)
        self.failed.set()  # wakes run(); the stop is told apart by self.stopping

    async def stop_children(self) -> bool:
        """Wait for every child (killing stragglers); True if all exited 0."""
        if not self.stopping:  # a failed start: no signal came, the children get one
            self.stopping = True
            self.signal_children(signal.SIGTERM)
        procs = [c.proc for c in self.children if c.proc is not None]
        deadline = self.settings.shutdown_timeout_s + STOP_GRACE_S
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), deadline)
        except TimeoutError:
            logger.error("server processes still running after %.0f s: killing", deadline)
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for c in self.children:
            if c.waiter is not None:
                c.waiter.cancel()
        return all(p.returncode == 0 for p in procs)

    async def run(self) -> int:
        reserved = reserve_port(self.settings.host, self.settings.port)
        self.port = reserved.getsockname()[1]
        loop = asyncio.get_running_loop()
        watchdog: asyncio.Task[None] | None = None
        try:
            self.open_inbox()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.on_signal, signum)
            for child in self.children:
                await self.spawn(child)
            ready = asyncio.create_task(self.all_ready.wait())
            failed = asyncio.create_task(self.failed.wait())
            await asyncio.wait([ready, failed], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            failed.cancel()
            if self.all_ready.is_set() and not self.stopping:
                where = f"http://{self.settings.host}:{self.port}"
                logger.info("Herald serving on %s with %d processes", where, self.count)
                self.notifier.ready(f"listening on {where} ({self.count} processes)")
                watchdog = asyncio.create_task(self.watchdog(), name="child-watchdog")
                self.failed.clear()
                await self.failed.wait()  # only a signal sets it from now on
            started_ok = self.all_ready.is_set() or self.stopping
            clean = await self.stop_children()
            logger.info("Herald stopped (%d processes)", self.count)
            return 0 if clean and started_ok else 1
        finally:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.wait([watchdog])
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if self.inbox is not None:
                loop.remove_reader(self.inbox.fileno())
                self.inbox.close()
            reserved.close()
            await self.notifier.close()
