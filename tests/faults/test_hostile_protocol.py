"""Hostile connections against the real runner: slowloris, unparsable requests, request
ids, the connection cap."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from server.protocol import REQUEST_ID_FORM, HeraldWebServer
from tests.helpers import wait_for
from tests.sse_helpers import live_server

HEADER_TIMEOUT_S = 0.5


async def read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read()


def split_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def test_slowloris_closed_by_the_deadline_normal_clients_unaffected(settings):
    async with live_server(settings, header_timeout_s=HEADER_TIMEOUT_S) as live:
        port = live.server.port
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        started = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        closed_at: list[float] = []

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for byte in head:
                if reader.at_eof():
                    break
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    break
                try:
                    async with asyncio.timeout(0.05):
                        if await reader.read(1) == b"":
                            break
                except TimeoutError:
                    pass
            closed_at.append(time.monotonic() - started)
            writer.close()

        tasks = [asyncio.create_task(trickle(r, w)) for r, w in conns]
        async with aiohttp.ClientSession() as session:
            # A normal client meanwhile: answered at once, several times.
            for _ in range(5):
                t0 = time.monotonic()
                async with session.get(f"{live.url}/health") as resp:
                    assert resp.status in (200, 503)
                assert time.monotonic() - t0 < HEADER_TIMEOUT_S
        async with asyncio.timeout(HEADER_TIMEOUT_S + 2):
            await asyncio.gather(*tasks)
        assert len(closed_at) == 20
        # Closed by the deadline, not by finishing the head (that takes ~5.5 s).
        assert all(HEADER_TIMEOUT_S - 0.1 <= t <= HEADER_TIMEOUT_S + 0.6 for t in closed_at), (
            closed_at
        )
        server = live.server.runner.server
        assert isinstance(server, HeraldWebServer)
        assert server.header_timeouts_total == 20


async def test_keepalive_connection_gets_a_fresh_header_deadline(settings):
    async with live_server(settings, header_timeout_s=HEADER_TIMEOUT_S) as live:
        reader, writer = await asyncio.open_connection("127.0.0.1", live.server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(3):
            status_line = await reader.readline()
            assert b" 200 " in status_line or b" 503 " in status_line
        # Idle after a whole request: kept open past the header timeout (idle keep-alive
        # is 75 s); then a partial head is closed at its own deadline.
        await asyncio.sleep(HEADER_TIMEOUT_S * 2)  # a duration under test, not a sync
        while True:
            line = await reader.readline()
            if line == b"\r\n":
                break
        writer.write(b"GET /health HTTP/1.1\r\n")
        t0 = time.monotonic()
        rest = await read_all(reader, HEADER_TIMEOUT_S + 2)
        elapsed = time.monotonic() - t0
        assert HEADER_TIMEOUT_S - 0.1 <= elapsed <= HEADER_TIMEOUT_S + 0.6, elapsed
        assert b"HTTP/1.1" not in rest  # closed without a second answer
        writer.close()


UNPARSABLE = {
    "long header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Secret: "
    + b"s3cr3t" * 2000
    + b"\r\n\r\n",
    "bad content-length": (
        b"POST /api/v1/me HTTP/1.1\r\nHost: x\r\nContent-Length: zz-s3cr3t\r\n\r\n"
    ),
    "raw xff in path": b"GET /s3cr3t\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage request line": b"S3CR3T \x01\x02 garbage\r\n\r\n",
    "bad header": b"GET / HTTP/1.1\r\nHo st\x00s3cr3t: y\r\n\r\n",
}


async def test_unparsable_requests_get_json_4xx_echoing_nothing(settings):
    async with live_server(settings) as live:
        for what, data in UNPARSABLE.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", live.server.port)
            writer.write(data)
            raw = await read_all(reader, 3)
            writer.close()
            status, headers, body = split_answer(raw)
            assert 400 <= status < 500, (what, raw[:200])
            assert headers["content-type"].startswith("application/json"), (what, headers)
            doc = json.loads(body)
            assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, what
            assert b"s3cr3t" not in raw.lower() and b"garbage" not in raw, (what, raw)
            assert REQUEST_ID_FORM.fullmatch(headers["x-request-id"]), what


async def test_request_id_on_every_answer(settings, make_user):
    user = await make_user("alice")
    async with live_server(settings) as live, aiohttp.ClientSession() as session:
        seen = set()
        for method, path, headers, status in [
            ("GET", "/api/v1/me", user.headers, 200),
            ("GET", "/api/v1/me", {"Authorization": "Bearer nope"}, 401),
            ("GET", "/api/v1/nowhere", user.headers, 404),
            ("PUT", "/api/v1/me", user.headers, 405),
            ("GET", "/health", {}, None),
        ]:
            async with session.request(method, live.url + path, headers=headers) as resp:
                assert status is None or resp.status == status, (path, resp.status)
                rid = resp.headers["X-Request-ID"]
                assert REQUEST_ID_FORM.fullmatch(rid)
                seen.add(rid)
        assert len(seen) == 5
        # An untrusted peer cannot choose its id.
        async with session.get(
            live.url + "/api/v1/me", headers={**user.headers, "X-Request-ID": "mine-1"}
        ) as resp:
            assert resp.headers["X-Request-ID"] != "mine-1"


async def test_request_id_from_trusted_proxy_validated(settings, make_user):
    import ipaddress

    user = await make_user("alice")
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    async with (
        live_server(settings, trusted_proxies=trusted) as live,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(
            live.url + "/api/v1/me", headers={**user.headers, "X-Request-ID": "proxy-abc.1"}
        ) as resp:
            assert resp.headers["X-Request-ID"] == "proxy-abc.1"
        async with session.get(
            live.url + "/api/v1/me", headers={**user.headers, "X-Request-ID": 'bad id"<>'}
        ) as resp:
            assert resp.headers["X-Request-ID"] not in ('bad id"<>', "")


async def test_connections_over_the_cap_refused_cleanly(settings):
    async with live_server(settings) as live:
        server = live.server.runner.server
        assert isinstance(server, HeraldWebServer)
        server.cap = 3
        held = [await asyncio.open_connection("127.0.0.1", live.server.port) for _ in range(3)]
        refused = []
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", live.server.port)
            refused.append(await read_all(reader, 3))
            writer.close()
        for raw in refused:
            status, _, body = split_answer(raw)
            assert status == 503 and json.loads(body)["error"]["code"] == "server_busy"
        assert server.refused_total == 5
        for _, writer in held:
            writer.close()
        # Accepts again once connections free up.
        deadline = time.monotonic() + 3
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"{live.url}/health") as resp:
                        if "status" in await resp.json():  # /health itself, not the refusal
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)


async def test_request_id_in_the_request_log_lines(settings, make_user):
    import logging

    from shared.logcontext import RequestIdFilter

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(RequestIdFilter())
    access = logging.getLogger("aiohttp.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    user = await make_user("alice")
    try:
        async with live_server(settings) as live, aiohttp.ClientSession() as session:
            async with session.get(live.url + "/api/v1/me", headers=user.headers) as resp:
                rid = resp.headers["X-Request-ID"]
            await wait_for(lambda: any(r.request_id == rid for r in records), 3, "access line")
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
