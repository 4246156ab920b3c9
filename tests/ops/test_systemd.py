"""The systemd units in systemd/: they verify, their hardening scores, and the notify
protocol they rely on (Type=notify, WatchdogSec=) spoken by real ``herald serve`` and
``herald worker`` processes to a datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from shared.constants import WORKER_HEALTH_KEY
from shared.settings import MAX_SHUTDOWN_TIMEOUT_S, Settings

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("herald-server.service", "herald-worker.service")
HERALD = str(Path(sys.executable).parent / "herald")
INSTALLED_HERALD = "/opt/herald/.venv/bin/herald"
MAX_EXPOSURE = 2.0
EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")
WATCHDOG_USEC = 1_000_000  # the process pings every 0.5 s; systemd would allow 1 s

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian: apt-get install systemd)",
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def unit_settings(unit: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (every value of a repeated key)."""
    found: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / unit).read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart= names an executable: point it at this checkout's.
    for unit in UNITS:
        text = (ROOT / "systemd" / unit).read_text(encoding="utf-8")
        assert INSTALLED_HERALD in text
        (tmp_path / unit).write_text(text.replace(INSTALLED_HERALD, HERALD), encoding="utf-8")
    result = analyze("verify", *(str(tmp_path / unit) for unit in UNITS))
    # Unknown keys and bad values are warnings with exit code 0: any line about our
    # units fails the test.
    ours = [line for line in result.stderr.splitlines() if "herald-" in line]
    assert result.returncode == 0 and not ours, result.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_low(unit: str) -> None:
    result = analyze("security", "--offline=true", str(ROOT / "systemd" / unit))
    found = EXPOSURE.search(result.stdout + result.stderr)
    assert found and found.group(1) == unit, result.stdout + result.stderr
    assert float(found.group(2)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_unit_stop_timeout_is_above_the_longest_drain(unit: str) -> None:
    keys = unit_settings(unit)
    assert keys["Type"] == ["notify"]
    assert int(keys["WatchdogSec"][0]) > 0
    assert float(keys["TimeoutStopSec"][0]) >= MAX_SHUTDOWN_TIMEOUT_S + 10
    # Environment= sets the upload folder inside StateDirectory=; the optional
    # EnvironmentFile= comes after it and wins.
    assert "HERALD_UPLOAD_DIR=/var/lib/herald/uploads" in keys["Environment"]
    assert keys["StateDirectory"] == ["herald"]
    assert keys["EnvironmentFile"] == ["-/etc/herald/herald.env"]


# --- The notify protocol, spoken by real processes ---------------------------------


class SystemdStandIn:
    """The receiving end of NOTIFY_SOCKET, as systemd binds it."""

    def __init__(self, address: str | bytes, notify_socket: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.notify_socket = notify_socket

    async def receive(self, timeout: float) -> dict[str, str]:
        async with asyncio.timeout(timeout):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    async def next_state(self, timeout: float) -> dict[str, str]:
        """The next datagram that is not a watchdog ping."""
        async with asyncio.timeout(timeout):
            while (message := await self.receive(timeout)) == {"WATCHDOG": "1"}:
                pass
        return message

    async def pings(self, count: int) -> None:
        """``count`` pings, each within systemd's watchdog limit of the one before."""
        for _ in range(count):
            assert await self.receive(WATCHDOG_USEC / 1e6) == {"WATCHDOG": "1"}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[SystemdStandIn]:
    path = str(tmp_path / "notify")
    stand_in = SystemdStandIn(path, path)
    yield stand_in
    stand_in.close()


@pytest.fixture
def abstract_socket() -> Iterator[SystemdStandIn]:
    name = f"herald-test-{os.getpid()}-{uuid.uuid4().hex}"
    stand_in = SystemdStandIn(b"\0" + name.encode(), f"@{name}")
    yield stand_in
    stand_in.close()


@asynccontextmanager
async def herald(
    command: str, settings: Settings, tmp_path: Path, notify: SystemdStandIn, *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """``herald COMMAND`` as systemd would start it; its log goes to a file."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HERALD_", "CRON_", "DATABASE_", "REDIS_", "NOTIFY_", "WATCHDOG_"))
    }
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        HERALD_HOST="127.0.0.1",
        HERALD_PORT="0",
        HERALD_UPLOAD_DIR=str(tmp_path / "uploads"),
        HERALD_SHUTDOWN_TIMEOUT_S="1",
        NOTIFY_SOCKET=notify.notify_socket,
        WATCHDOG_USEC=str(WATCHDOG_USEC),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / f"{command}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            HERALD, command, *args, env=env, cwd=tmp_path, stdout=out, stderr=out
        )
    try:
        yield proc, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop_and_expect_clean_exit(
    proc: asyncio.subprocess.Process, log: Path, notify: SystemdStandIn
) -> None:
    proc.send_signal(signal.SIGTERM)
    stopping = await notify.next_state(timeout=5)
    assert stopping["STOPPING"] == "1", stopping
    code = await asyncio.wait_for(proc.wait(), 15)
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text


async def test_serve_notifies_ready_watchdog_and_stopping(
    settings: Settings, tmp_path: Path, path_socket: SystemdStandIn
) -> None:
    async with herald("serve", settings, tmp_path, path_socket) as (proc, log):
        ready = await path_socket.next_state(timeout=30)
        assert ready["READY"] == "1", (ready, log.read_text())
        status = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)", ready["STATUS"])
        assert status, ready
        # READY=1 came after the listener: the port accepts a connection right now.
        _, writer = await asyncio.open_connection("127.0.0.1", int(status.group(1)))
        writer.close()
        await writer.wait_closed()
        await path_socket.pings(4)
        await stop_and_expect_clean_exit(proc, log, path_socket)


async def test_serve_with_processes_notifies_ready_once_all_children_are(
    settings: Settings, tmp_path: Path, path_socket: SystemdStandIn
) -> None:
    """The supervisor speaks for its children: one READY=1 when both listen (they report
    to it, not to systemd), its own watchdog pings, STOPPING=1, exit 0 after both drain."""
    async with herald("serve", settings, tmp_path, path_socket, "--processes", "2") as (
        proc,
        log,
    ):
        ready = await path_socket.next_state(timeout=30)
        assert ready["READY"] == "1", (ready, log.read_text())
        status = re.fullmatch(
            r"listening on http://127\.0\.0\.1:(\d+) \(2 processes\)", ready["STATUS"]
        )
        assert status, ready
        assert log.read_text().count("Herald listening on") == 2, log.read_text()
        _, writer = await asyncio.open_connection("127.0.0.1", int(status.group(1)))
        writer.close()
        await writer.wait_closed()
        await path_socket.pings(4)
        await stop_and_expect_clean_exit(proc, log, path_socket)


async def test_worker_notifies_ready_watchdog_and_stopping(
    settings: Settings, tmp_path: Path, abstract_socket: SystemdStandIn, redis
) -> None:
    async with herald("worker", settings, tmp_path, abstract_socket) as (proc, log):
        ready = await abstract_socket.next_state(timeout=30)
        assert ready == {"READY": "1", "STATUS": "connected, taking jobs"}, log.read_text()
        # READY=1 came after arq's start-up and on_startup (which logs this line).
        assert "worker.app: worker started" in log.read_text()
        await abstract_socket.pings(4)
        # And it polls the queue: its first poll writes the health key.
        async with asyncio.timeout(10):
            while not await redis.exists(WORKER_HEALTH_KEY):
                await asyncio.sleep(0.05)
        await stop_and_expect_clean_exit(proc, log, abstract_socket)
