"""Graceful shutdown: a real ``herald serve`` process sent SIGTERM with open streams,
and a reader that never reads being dropped at the drain deadline."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time

import aiohttp

from shared.db.pool import Database
from shared.services.users import UserService
from tests.helpers import wait_for
from tests.sse_helpers import SSEReader, auth, live_server, raw_stream

SHUTDOWN_S = 2.0
LISTENING = re.compile(rb"Herald listening on http://127\.0\.0\.1:(\d+)")


async def start_serve(settings, tmp_path) -> tuple[asyncio.subprocess.Process, int, list[bytes]]:
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
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "herald",
        "serve",
        cwd=tmp_path,  # no stray .env
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[bytes] = []
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = await proc.stderr.readline()
            assert line, b"".join(lines).decode()
            lines.append(line)
            found = LISTENING.search(line)
            if found:
                return proc, int(found.group(1)), lines


async def test_sigterm_closes_every_stream_and_exits_zero(settings, db: Database, tmp_path):
    _, token = await UserService(db=db).create("alice")
    proc, port, lines = await start_serve(settings, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                f"{base}/api/v1/channels", json={"name": "general"}, headers=auth(token)
            )
            channel_id = (await resp.json())["id"]
            url = f"{base}/api/v1/channels/{channel_id}/events"
            streams = []
            for _ in range(4):
                stream = await session.get(url, headers=auth(token))
                assert stream.status == 200
                reader = SSEReader(stream.content)
                await reader.until("ready")
                streams.append(reader)
            resp = await session.post(
                f"{base}/api/v1/channels/{channel_id}/messages",
                json={"body": "before shutdown"},
                headers=auth(token),
            )
            assert resp.status == 201
            for reader in streams:
                assert (await reader.until("message")).data["body"] == "before shutdown"

            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            closes = [await reader.until("close", timeout=SHUTDOWN_S + 1) for reader in streams]
            assert all(c.data["reason"] == "shutdown" for c in closes)
            delays = {c.data["reconnect_after_ms"] for c in closes}
            assert all(1000 <= d <= 5000 for d in delays)
            assert all(c.retry == c.data["reconnect_after_ms"] for c in closes)
            assert [await reader.next() for reader in streams] == [None] * 4
            # It stopped listening: new connections are refused, not answered.
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0
            code = await asyncio.wait_for(proc.wait(), SHUTDOWN_S + 1)
            elapsed = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    log = (b"".join(lines) + await proc.stderr.read()).decode()
    assert code == 0, log
    assert elapsed <= SHUTDOWN_S + 1, elapsed
    assert "Traceback" not in log
    assert token not in log


async def test_reader_that_never_reads_is_dropped_at_the_deadline(settings, db: Database):
    async with live_server(settings, shutdown_timeout_s=1.0) as live:
        user, token = await live.user("alice")
        channel_id = await live.channel(user)
        await db.execute(
            "INSERT INTO messages (channel_id, author_id, body)"
            " SELECT %s, %s, repeat('x', 10000) FROM generate_series(1, 1000)",
            (channel_id, user.id),
        )
        path = f"/api/v1/channels/{channel_id}/events?last_event_id=0"
        sock = await raw_stream(live.server.port, path, token, "127.0.0.2", rcvbuf=4096)
        try:
            # The replay (10 MB) fills every buffer and the handler waits to write more.
            await wait_for(lambda: live.manager.replayed_total == 0 and live.manager.streams, 3)
            stream = next(iter(live.manager.streams.values()))
            await wait_for(lambda: stream.transport.get_write_buffer_size() > 0, 5, "backlog")
            started = time.monotonic()
            await live.server.stop()
            elapsed = time.monotonic() - started
            assert 0.9 <= elapsed <= 2.0, elapsed
            assert live.manager.streams == {}
            assert stream.transport.is_closing()
            assert live.manager.closed["shutdown"] == 1
        finally:
            sock.close()
