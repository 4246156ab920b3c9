"""A real browser: headless Chromium opens an EventSource from a page on an allowed
origin, receives messages, rides through a server restart on its own reconnect
(Last-Event-ID), and ends with every message exactly once.

Driven over the DevTools protocol with aiohttp's websocket client. Needs Debian's
``chromium`` package (``apt-get install -y chromium``); skipped without it.
"""

from __future__ import annotations

import json
import shutil
from contextlib import suppress
from dataclasses import replace
from typing import Any

from aiohttp import web

from server.keys import CHANNELS, USERS
from server.runner import HeraldServer
from shared.bus import EventBus
from shared.metrics import Metrics
from shared.services.messages import MessageService
from tests.browser_helpers import chromium, free_port, needs_chromium
from tests.helpers import wait_for

pytestmark = needs_chromium

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
