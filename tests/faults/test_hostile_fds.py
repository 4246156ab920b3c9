"""Out of file descriptors in a real ``herald serve`` (RLIMIT_NOFILE lowered in the
child, then lowered below what it holds with prlimit): streams keep flowing, at most one
line per second about it, and it accepts again once descriptors free up."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import socket
import sys
import time

from shared.db.pool import Database
from shared.services.users import UserService
from tests.helpers import wait_for

LISTENING = re.compile(rb"Herald listening on http://127\.0\.0\.1:(\d+)")


def low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def test_emfile_streams_flow_log_is_quiet_and_accepting_resumes(
    settings, db: Database, tmp_path
):
    _, token = await UserService(db=db).create("alice")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        HERALD_HOST="127.0.0.1",
        HERALD_PORT="0",
        HERALD_SSE_HEARTBEAT_S="0.2",
        HERALD_UPLOAD_DIR=str(tmp_path / "uploads"),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "herald",
        "serve",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=low_nofile,
    )
    assert proc.stderr is not None
    lines: list[bytes] = []

    async def pump() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            lines.append(line)

    reader_task = asyncio.create_task(pump())
    flood: list[socket.socket] = []
    try:
        await wait_for(lambda: any(LISTENING.search(x) for x in lines), 20, "listening")
        port = int(next(LISTENING.search(x) for x in lines if LISTENING.search(x)).group(1))
        # Two streams and a spare idle connection, opened while descriptors are free.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        auth = f"Authorization: Bearer {token}\r\n"
        w.write(f"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        async with asyncio.timeout(5):
            assert b" 200 " in await r.readline()
        spare = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _, sw in spare:  # make them real connections in the server
            sw.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.5)
        nfd = len(os.listdir(f"/proc/{proc.pid}/fd"))
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (nfd, 256))
        started_log = len(lines)
        t0 = time.monotonic()
        for _ in range(40):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            flood.append(s)
        # Out of descriptors for 3 s: the stream keeps getting heartbeats.
        beats = 0
        async with asyncio.timeout(6):
            while time.monotonic() - t0 < 3:
                line = await r.readline()
                beats += line.startswith(b"event: heartbeat")
        window = time.monotonic() - t0
        about = [x for x in lines[started_log:] if b"cannot accept" in x or b"accept()" in x]
        assert beats >= 5, beats
        assert 1 <= len(about) <= window + 1, (len(about), window)
        assert not any(b"Traceback" in x for x in lines[started_log:])
        # Free descriptors: the server accepts again by itself.
        for _, sw in spare:
            sw.close()
        # Descriptors free up (the limit back where it was: the 40 queued connections are
        # accepted in one pass, without waiting for each to close).
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (256, 256))
        r2, w2 = None, None
        async with asyncio.timeout(5):
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            w2.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await r2.readline()).split()[1] in (b"200", b"503")
        w2.close()
        w.close()
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        await reader_task
    print(f"EMFILE window {window:.1f}s: {len(about)} log lines, {beats} heartbeats")
