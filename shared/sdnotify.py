"""systemd's notify protocol (``sd_notify(3)``), the few lines of it Herald needs.

A ``Type=notify`` unit gives the process ``NOTIFY_SOCKET``, an AF_UNIX datagram socket
(a path, or an abstract name written with a leading ``@``); each datagram is
newline-separated ``KEY=VALUE`` lines: ``READY=1`` once serving, ``STOPPING=1`` when the
stop begins, ``STATUS=…`` for ``systemctl status``, ``WATCHDOG=1`` at least once per
``WATCHDOG_USEC``. Settings reads the two variables (the environment has one reader).

The watchdog pings come from a task on the event loop, not a thread: a loop that stalls
(a blocking call, a busy handler) stops pinging, and systemd restarts the process —
which is the point. Sends never block and never raise: with systemd's queue full or
its socket gone a ping is dropped and logged, and the service carries on.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from shared.settings import Settings

logger = logging.getLogger(__name__)


def socket_address(notify_socket: str) -> str | bytes | None:
    """The address to send to: a path, or an abstract name (``@`` becomes a NUL byte);
    None for what libsystemd also refuses (a relative path)."""
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    if notify_socket.startswith("/"):
        return notify_socket
    return None


class Notifier:
    """Sends states to the service manager; with no socket every call does nothing
    (not under systemd, or a test), so callers never check."""

    def __init__(self, notify_socket: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = socket_address(notify_socket) if notify_socket else None
        if notify_socket and self.address is None:
            logger.warning(
                "NOTIFY_SOCKET %r is not an absolute path or @name: ignored", notify_socket
            )
        self.watchdog_usec = watchdog_usec if self.address is not None else None
        self._failing = False
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Notifier:
        return cls(settings.notify_socket, settings.watchdog_usec)

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of systemd's watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; False if it could not be sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            # Once per run of failures: a ping every few seconds must not flood the log.
            if not self._failing:
                logger.warning("cannot notify systemd (%s): %s", lines[0], exc)
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str) -> None:
        """``READY=1``, and the watchdog pings begin: systemd arms its watchdog timer
        at READY, so a slow start-up (a database still coming up) is not a stall."""
        self.send("READY=1", f"STATUS={status}")
        self.start_watchdog()

    def start_watchdog(self) -> None:
        """Begin the pings now (idempotent): a process that waits for its backends
        before READY is alive, not stalled (systemd ignores pings before READY)."""
        interval = self.watchdog_interval_s
        if interval is not None and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._ping(interval), name="systemd-watchdog")

    def stopping(self, status: str) -> None:
        # The pings go on through the drain: a drain that hangs the loop is a stall too.
        self.send("STOPPING=1", f"STATUS={status}")

    async def close(self) -> None:
        """Stop the pings (waits for the task, without swallowing our own cancellation)."""
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def _ping(self, interval_s: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval_s)
