"""``herald serve --processes 2``: two server processes on one port (SO_REUSEPORT) under
a supervisor. Both serve, a message posted through one reaches a stream held by the
other, a killed one is restarted, SIGTERM drains both and the parent exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from shared.db.pool import Database
from shared.services.users import UserService
from shared.settings import Settings
from tests.helpers import wait_for

SHUTDOWN_S = 2.0
LISTENING = re.compile(r"Herald listening on http://127\.0\.0\.1:(\d+) \(pid (\d+), (\w+) loop\)")
SERVING = re.compile(r"Herald serving on http://127\.0\.0\.1:(\d+) with 2 processes")


class Serve:
    """A ``herald serve`` subprocess whose stderr lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self.lines)

    def found(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        return [m for line in self.lines if (m := pattern.search(line))]


async def start(settings: Settings, tmp_path: Path, *args: str, **extra: str) -> Serve:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("HERALD_") and k != "CRON_SECRET"
    }
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        HERALD_HOST="127.0.0.1",
        HERALD_PORT="0",
        HERALD_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S),
        HERALD_UPLOAD_DIR=str(tmp_path / "uploads"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "herald",
        "serve",
        *args,
        cwd=tmp_path,  # no stray .env
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return Serve(proc)


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str, body: bytes = b""
) -> tuple[int, dict[str, object]]:
    """One request on a kept-alive connection; the status and the JSON body."""
    writer.write(head.encode() + body)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    data = await reader.readexactly(length)
    return status, json.loads(data) if data else {}


async def connection_to(port: int, pid: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection the kernel gave to process ``pid`` (as its /health says)."""
    for _ in range(200):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _, health = await request(reader, writer, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        process = health["process"]
        assert isinstance(process, dict)
        if process["pid"] == pid:
            return reader, writer
        writer.close()
        await writer.wait_closed()
    raise AssertionError(f"no connection reached pid {pid}")


async def health_pids(port: int, tries: int = 60) -> set[int]:
    pids = set()
    for _ in range(tries):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _, health = await request(reader, writer, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.close()
        await writer.wait_closed()
        process = health["process"]
        assert isinstance(process, dict)
        pids.add(int(process["pid"]))
    return pids


async def test_two_processes_share_the_port_deliver_across_restart_and_drain(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    _, token = await UserService(db=db).create("alice")
    auth = f"Authorization: Bearer {token}\r\n"
    serve = await start(settings, tmp_path, "--processes", "2", HERALD_UVLOOP="1")
    try:
        await wait_for(lambda: serve.found(SERVING), 30, f"serving: {serve.text()}")
        children = serve.found(LISTENING)
        ports = {int(m.group(1)) for m in children}
        pids = {int(m.group(2)) for m in children}
        assert len(children) == 2 and len(ports) == 1 and len(pids) == 2, serve.text()
        assert {m.group(3) for m in children} == {"uvloop"}
        (port,) = ports
        assert serve.proc.pid not in pids

        # Both processes answer on the one port.
        assert await health_pids(port) == pids

        # A stream held by one process gets a message posted through the other.
        a, b = sorted(pids)
        sr, sw = await connection_to(port, a)
        pr, pw = await connection_to(port, b)
        body = b'{"name": "general"}'
        status, channel = await request(
            pr,
            pw,
            f"POST /api/v1/channels HTTP/1.1\r\nHost: x\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n",
            body,
        )
        assert status == 201, channel
        events = f"/api/v1/channels/{channel['id']}/events"
        sw.write(f"GET {events} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        async with asyncio.timeout(5):
            assert b" 200 " in await sr.readline()
            while b"event: ready" not in await sr.readline():
                pass
        body = b'{"body": "across processes"}'
        status, message = await request(
            pr,
            pw,
            f"POST /api/v1/channels/{channel['id']}/messages HTTP/1.1\r\nHost: x\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n",
            body,
        )
        assert status == 201, message
        async with asyncio.timeout(5):
            while b"across processes" not in await sr.readline():
                pass
        for w in (sw, pw):
            w.close()

        # A process that dies is replaced; the port keeps answering meanwhile.
        os.kill(a, signal.SIGKILL)
        await wait_for(lambda: len(serve.found(LISTENING)) == 3, 15, serve.text())
        replacement = int(serve.found(LISTENING)[-1].group(2))
        assert replacement not in pids
        assert await health_pids(port) == {b, replacement}

        # SIGTERM: both drain, the parent exits 0 within the drain window and a margin.
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(serve.proc.wait(), SHUTDOWN_S + 10)
        assert code == 0, serve.text()
        assert time.monotonic() - t0 < SHUTDOWN_S + 10
        await serve.pump
        for pid in (b, replacement):
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
        assert "Traceback" not in serve.text()
    finally:
        if serve.proc.returncode is None:
            serve.proc.kill()
            await serve.proc.wait()


async def test_by_default_the_standard_loop_runs(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    serve = await start(settings, tmp_path)
    try:
        await wait_for(lambda: serve.found(LISTENING), 30, f"listening: {serve.text()}")
        (found,) = serve.found(LISTENING)
        assert found.group(3) == "asyncio"
        reader, writer = await asyncio.open_connection("127.0.0.1", int(found.group(1)))
        _, health = await request(reader, writer, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.close()
        assert health["process"] == {"pid": int(found.group(2)), "index": None, "loop": "asyncio"}
        serve.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.proc.wait(), SHUTDOWN_S + 10) == 0
    finally:
        if serve.proc.returncode is None:
            serve.proc.kill()
            await serve.proc.wait()


async def test_a_taken_port_is_one_line_and_exit_1(settings: Settings, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = await start(settings, tmp_path, "--processes", "2", HERALD_PORT=str(port))
        code = await asyncio.wait_for(serve.proc.wait(), 20)
        await serve.pump
    assert code == 1, serve.text()
    assert f"cannot listen on 127.0.0.1:{port}" in serve.text()
    assert "Traceback" not in serve.text()
