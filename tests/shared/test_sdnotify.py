"""The notify protocol against a real datagram socket, as systemd would receive it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.sdnotify import Notifier, socket_address


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """systemd's side: a bound datagram socket and the NOTIFY_SOCKET naming it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        yield str(path), sock


async def receive(sock: socket.socket, timeout: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await asyncio.get_running_loop().sock_recv(sock, 4096)


async def nothing_within(sock: socket.socket, seconds: float) -> bool:
    try:
        await receive(sock, seconds)
    except TimeoutError:
        return True
    return False


def queued(sock: socket.socket) -> list[bytes]:
    """The datagrams waiting now, without waiting for more."""
    found = []
    while True:
        try:
            found.append(sock.recv(4096))
        except BlockingIOError:
            return found


def test_socket_address() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@herald/notify") == b"\0herald/notify"
    assert socket_address("relative/notify") is None


async def test_ready_and_stopping_are_one_datagram_each(listener) -> None:
    path, sock = listener
    notifier = Notifier(path)
    notifier.ready("listening on http://127.0.0.1:8080")
    assert await receive(sock) == b"READY=1\nSTATUS=listening on http://127.0.0.1:8080"
    notifier.stopping("draining streams")
    assert await receive(sock) == b"STOPPING=1\nSTATUS=draining streams"
    await notifier.close()


async def test_abstract_socket() -> None:
    name = f"herald-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        assert Notifier(f"@{name}").send("READY=1")
        assert await receive(sock) == b"READY=1"


async def test_no_socket_does_nothing() -> None:
    notifier = Notifier(None, watchdog_usec=1_000_000)
    assert not notifier.send("READY=1")
    notifier.ready("x")  # no ping task without a socket
    assert notifier.watchdog_interval_s is None
    await notifier.close()


def test_relative_path_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier("notify.sock")
    assert not notifier.send("READY=1")
    assert "NOTIFY_SOCKET 'notify.sock'" in caplog.text


def test_a_socket_that_is_gone_warns_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="shared.sdnotify"):
        assert not notifier.send("WATCHDOG=1")
        assert not notifier.send("WATCHDOG=1")
    assert len(caplog.records) == 1
    assert "cannot notify systemd (WATCHDOG=1)" in caplog.text


async def test_watchdog_pings_at_half_the_interval_from_ready_until_close(listener) -> None:
    path, sock = listener
    notifier = Notifier(path, watchdog_usec=200_000)
    assert notifier.watchdog_interval_s == 0.1
    assert await nothing_within(sock, 0.3)  # systemd arms its watchdog at READY
    notifier.ready("up")
    assert await receive(sock) == b"READY=1\nSTATUS=up"
    arrivals = []
    for _ in range(4):
        assert await receive(sock, timeout=0.5) == b"WATCHDOG=1"
        arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.05 < gap < 0.5 for gap in gaps), gaps
    await notifier.close()
    queued(sock)  # sent before close
    assert await nothing_within(sock, 0.3)


async def test_a_stalled_loop_stops_the_pings(listener) -> None:
    path, sock = listener
    notifier = Notifier(path, watchdog_usec=100_000)
    notifier.ready("up")
    assert await receive(sock) == b"READY=1\nSTATUS=up"
    assert await receive(sock) == b"WATCHDOG=1"
    time.sleep(0.5)  # the stall under test: the loop runs nothing for 0.5 s
    # Sent while blocked: none (asyncio.sleep never returned); from just before: ≤ 1.
    assert len(queued(sock)) <= 1
    await notifier.close()
