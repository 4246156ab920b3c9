"""A real browser: headless Chromium opens an EventSource from a page on an allowed
origin, receives messages, rides through a server restart on its own reconnect
(Last-Event-ID), and ends with every message exactly once.

Driven over the DevTools protocol with aiohttp's websocket client. Needs Debian's
``chromium`` package (``apt-get install -y chromium``); skipped without it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.keys import CHANNELS, USERS
from server.runner import HeraldServer
from shared.bus import EventBus
from shared.metrics import Metrics
from shared.services.messages import MessageService
from tests.helpers import wait_for

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs headless Chromium: apt-get update && apt-get install -y chromium",
)

PAGE = """<!doctype html><meta charset="utf-8"><title>herald</title><script>
window.state = {received: [], events: []};
const es = new EventSource(%s);
es.addEventListener("ready", () => state.events.push("ready"));
es.addEventListener("message", (e) => {
  const data = JSON.parse(e.data);
  state.received.push({id: data.id, lastEventId: e.lastEventId, body: data.body});
});
es.addEventListener("close", (e) => state.events.push("close:" + JSON.parse(e.data).reason));
es.onerror = () => state.events.push("error");
</script>"""


def free_port() -> int:
    """A free port in this suite's range (a restart must get the same one back)."""
    for port in range(21000, 22000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 21000-21999")


class DevTools:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def evaluate(self, expression: str) -> Any:
        self.next_id += 1
        await self.ws.send_json(
            {
                "id": self.next_id,
                "method": "Runtime.evaluate",
                "params": {"expression": expression, "returnByValue": True},
            }
        )
        while True:
            msg = await self.ws.receive_json(timeout=10)
            if msg.get("id") == self.next_id:
                return msg["result"]["result"].get("value")


@asynccontextmanager
async def chromium(url: str, profile: Path) -> AsyncIterator[DevTools]:
    proc = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            "--disable-quic",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        await wait_for(lambda: active.exists() and active.read_text().strip(), 30, "Chromium")
        port = int(active.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            targets: list[dict[str, Any]] = []

            async def page_target() -> bool:
                nonlocal targets
                async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = [t for t in await resp.json() if t.get("type") == "page"]
                return bool(targets)

            await wait_for(page_target, 30, "the page target")
            async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_browser_eventsource_survives_restart_exactly_once(settings, db, redis, tmp_path):
    herald_port, page_port = free_port(), 0
    page_app = web.Application()
    page_html: list[str] = []

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=page_html[0], content_type="text/html")

    page_app.router.add_get("/", page)
    page_runner = web.AppRunner(page_app)
    await page_runner.setup()
    page_site = web.TCPSite(page_runner, "127.0.0.1", page_port)
    await page_site.start()
    page_port = page_runner.addresses[0][1]
    origin = f"http://127.0.0.1:{page_port}"
    config = replace(settings, cors_origins=frozenset({origin}), shutdown_timeout_s=2.0)

    server = HeraldServer(config)
    await server.start("127.0.0.1", herald_port)
    offline = MessageService(db=db, bus=EventBus(redis, config), metrics=Metrics.null())
    try:
        user, token = await server.app[USERS].create("browser")
        channel = await server.app[CHANNELS].create(user, "general", "", False)
        events_url = (
            f"http://127.0.0.1:{herald_port}/api/v1/channels/{channel['id']}/events"
            f"?access_token={token}"
        )
        page_html.append(PAGE % json.dumps(events_url))
        posted: list[int] = []

        async def post(body: str) -> None:
            posted.append((await offline.post(user, channel["id"], body))["id"])

        async with chromium(f"{origin}/", tmp_path / "profile") as devtools:

            async def state() -> dict[str, Any]:
                return await devtools.evaluate("window.state") or {}

            async def has(n: int) -> bool:
                return len((await state()).get("received", [])) >= n

            await wait_for(lambda: _contains(state(), "ready"), 30, "the stream to open")
            for i in range(3):
                await post(f"before {i}")
            await wait_for(lambda: has(3), 10, "live messages")

            await server.stop()  # the browser gets close (shutdown) and will come back
            for i in range(2):
                await post(f"while down {i}")  # stored; nobody is listening
            server = HeraldServer(config)
            await server.start("127.0.0.1", herald_port)
            await wait_for(lambda: has(5), 20, "the replay after reconnect")
            for i in range(2):
                await post(f"after {i}")
            await wait_for(lambda: has(7), 10, "live messages after reconnect")
            final = await state()
        ids = [m["id"] for m in final["received"]]
        assert ids == posted  # every message, once, in order
        assert [m["lastEventId"] for m in final["received"]] == [str(i) for i in posted]
        assert "close:shutdown" in final["events"]
        assert final["events"].count("ready") == 2
    finally:
        await server.stop()
        await page_runner.cleanup()
        with suppress(FileNotFoundError):
            shutil.rmtree(tmp_path / "profile")


async def _contains(state_coro: Any, event: str) -> bool:
    state = await state_coro
    return event in state.get("events", [])
