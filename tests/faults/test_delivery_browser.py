"""A real browser on the multi-channel stream: headless Chromium opens one EventSource
on ``/api/v1/events?access_token=…&channels=a,b,c``, rides a server restart on its own
reconnect, and ends with every message of the three channels exactly once. The
browser's resume point is the cursor of the ``id:``-only frames (HTML's event-stream
parser takes an ``id:`` line even from a frame it does not dispatch): the messages
posted while the server was down reach it only because its reconnect sent that cursor
as ``Last-Event-ID``."""

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
es.addEventListener("ready", (e) => state.events.push("ready:" + e.lastEventId));
es.addEventListener("message", (e) => {
  const data = JSON.parse(e.data);
  state.received.push({id: data.id, channel: data.channel_id, lastEventId: e.lastEventId});
});
es.addEventListener("reset", () => state.events.push("reset"));
es.addEventListener("close", (e) => state.events.push("close:" + JSON.parse(e.data).reason));
es.onerror = () => state.events.push("error");
</script>"""


async def test_browser_multichannel_stream_rides_a_restart_once_each(settings, db, redis, tmp_path):
    herald_port = free_port()
    page_app = web.Application()
    page_html: list[str] = []

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=page_html[0], content_type="text/html")

    page_app.router.add_get("/", page)
    page_runner = web.AppRunner(page_app)
    await page_runner.setup()
    await web.TCPSite(page_runner, "127.0.0.1", 0).start()
    origin = f"http://127.0.0.1:{page_runner.addresses[0][1]}"
    config = replace(
        settings, cors_origins=frozenset({origin}), shutdown_timeout_s=2.0, sse_catchup_s=1.0
    )
    server = HeraldServer(config)
    await server.start("127.0.0.1", herald_port)
    offline = MessageService(db=db, bus=EventBus(redis, config), metrics=Metrics.null())
    try:
        user, token = await server.app[USERS].create("browser")
        channels = [
            int((await server.app[CHANNELS].create(user, f"c{i}", "", False))["id"])
            for i in range(3)
        ]
        ids = ",".join(map(str, channels))
        url = f"http://127.0.0.1:{herald_port}/api/v1/events?access_token={token}&channels={ids}"
        page_html.append(PAGE % json.dumps(url))
        posted: list[int] = []
        turn = 0

        async def post(n: int) -> None:
            nonlocal turn
            for _ in range(n):
                channel = channels[turn % len(channels)]
                turn += 1
                posted.append((await offline.post(user, channel, f"m{turn}"))["id"])

        async with chromium(f"{origin}/", tmp_path / "profile") as devtools:

            async def state() -> dict[str, Any]:
                return await devtools.evaluate("window.state") or {}

            async def has(n: int) -> bool:
                return len((await state()).get("received", [])) >= n

            async def opened(times: int) -> bool:
                events = (await state()).get("events", [])
                return sum(e.startswith("ready:") for e in events) >= times

            await wait_for(lambda: opened(1), 10, "the stream to open")
            await post(6)
            await wait_for(lambda: has(6), 10, "live messages")
            await post(1)  # its event's lastEventId is the cursor sent after the 6th
            await wait_for(lambda: has(7), 10, "one more")
            before = (await state())["received"]

            await server.stop()  # the browser gets close (shutdown) and comes back
            await post(5)  # stored while no server listens
            server = HeraldServer(config)
            await server.start("127.0.0.1", herald_port)
            await wait_for(lambda: opened(2), 30, "the browser to reconnect")
            await wait_for(lambda: has(12), 20, "the replay after the reconnect")
            await post(3)
            await wait_for(lambda: has(15), 10, "live messages after the reconnect")
            final = await state()
        got = [m["id"] for m in final["received"]]
        assert got == posted  # every message once, in order (so in order per channel)
        for c in channels:
            mine = [m["id"] for m in final["received"] if m["channel"] == c]
            assert mine == sorted(mine) and len(mine) == 5
        # The id:-only frames moved the browser's lastEventId to an opaque cursor.
        cursors = [m["lastEventId"] for m in before[1:]]
        assert all(c and not c.isdigit() and len(c) <= 512 for c in cursors), cursors
        assert len(set(cursors)) > 1
        # What it held when it reconnected (and so sent): a cursor, not a message id.
        readies = [e.split(":", 1)[1] for e in final["events"] if e.startswith("ready:")]
        assert readies[0] == "" and readies[1] and not readies[1].isdigit(), readies
        assert "close:shutdown" in final["events"] and "reset" not in final["events"]
    finally:
        await server.stop()
        await page_runner.cleanup()
        with suppress(FileNotFoundError):
            shutil.rmtree(tmp_path / "profile")
