"""The reference web client (web/, served at /app/ with HERALD_WEB_APP=1) in headless
Chromium, against real ``herald serve`` and ``herald worker`` processes.

Alice signs in with her token; Bob posts over REST. The page must show both channels,
bring Bob's messages into the right one within 2 s, count unread messages and clear the
count (with ``POST /read``) when the channel is opened, render an XSS body as text,
deliver a delayed message, upload and download an attachment, and ride a server
restart (SIGTERM, start again on the same port) showing "reconnecting…", then every
message posted meanwhile exactly once. The page may log no error. A screenshot lands
in the test's tmp_path (and at ``$HERALD_WEB_SCREENSHOT`` when set: that is how
docs/img/web-client.png is made)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.bus import EventBus, redis_client
from shared.metrics import Metrics
from shared.services.messages import MessageService
from shared.services.users import UserService
from shared.settings import Settings
from tests.browser_helpers import DevTools, chromium, needs_chromium
from tests.faults.delivery_procs import cluster, free_port
from tests.helpers import API, wait_for

pytestmark = [needs_chromium, pytest.mark.timeout(120)]

XSS = "<img src=x onerror=alert(1)>"
ATTACHMENT = b"hello from the web client test\n"


class Page:
    """The web client as the test sees it: a few DOM reads and clicks."""

    def __init__(self, devtools: DevTools) -> None:
        self.dt = devtools

    async def js(self, expression: str) -> Any:
        return await self.dt.evaluate(expression)

    async def status(self) -> str:
        return await self.js("document.getElementById('status').dataset.state")

    async def channels(self) -> dict[str, int]:
        """Channel name -> the unread count its badge shows (0 when hidden)."""
        rows = await self.js(
            "[...document.querySelectorAll('#channel-list button')].map(b => ["
            "b.querySelector('.name').textContent,"
            "b.querySelector('.unread').hidden ? 0"
            " : Number(b.querySelector('.unread').textContent)])"
        )
        return {name.removeprefix("# "): count for name, count in rows or []}

    async def open(self, channel_id: int) -> None:
        await self.js(f"document.querySelector('[data-channel-id=\"{channel_id}\"]').click()")

    async def shown(self) -> list[tuple[int, str]]:
        """(id, body text) of every message on screen, in screen order."""
        rows = await self.js(
            "[...document.querySelectorAll('#messages li')].map(li => "
            "[Number(li.dataset.id), li.querySelector('.body').textContent])"
        )
        return [(int(i), body) for i, body in rows or []]

    async def fill_and_submit(self, form: str, **values: str) -> None:
        sets = "".join(
            f"document.getElementById({json.dumps(k.replace('_', '-'))}).value = {json.dumps(v)};"
            for k, v in values.items()
        )
        await self.js(f"{sets} document.getElementById({json.dumps(form)}).requestSubmit()")


async def rest(
    http: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None
) -> Any:
    async with http.request(
        method, url, json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status < 300, (method, url, resp.status, await resp.text())
        return None if resp.status == 204 else await resp.json()


def page_errors(dt: DevTools, restart: tuple[float, float]) -> list[Any]:
    """Everything the page logged as an error. The one exception: while no server
    listened, the browser's own reconnect attempts fail with a refused connection and
    Chromium logs each as a network error; those are the restart working, not a bug."""
    errors: list[Any] = [
        e for e in dt.of("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")
    ]
    errors += dt.of("Runtime.exceptionThrown")
    for params in dt.of("Log.entryAdded"):
        entry = params["entry"]
        if entry["level"] != "error":
            continue
        during_restart = restart[0] <= entry["timestamp"] / 1000 <= restart[1]
        stream = f"{API}/events?" in entry.get("url", "")
        if entry.get("source") == "network" and during_restart and stream:
            continue
        errors.append(entry)
    return errors


async def test_web_client_in_chromium(database_url, db, tmp_path):
    started = time.monotonic()
    users = UserService(db=db)
    _, alice_token = await users.create("alice")
    bob, bob_token = await users.create("bob")
    port = free_port()
    downloads = tmp_path / "downloads"
    upload = tmp_path / "hello.txt"
    upload.write_bytes(ATTACHMENT)
    timings: dict[str, float] = {}
    async with cluster(database_url, tmp_path / "procs") as procs, aiohttp.ClientSession() as http:
        env = {"HERALD_PORT": str(port), "HERALD_WEB_APP": "1"}
        server = await procs.serve(**env)
        await procs.worker()
        base = f"http://127.0.0.1:{port}"
        general = await rest(
            http, "POST", f"{base}{API}/channels", alice_token, {"name": "general"}
        )
        random_ = await rest(http, "POST", f"{base}{API}/channels", alice_token, {"name": "random"})
        a, b = int(general["id"]), int(random_["id"])
        for channel in (a, b):
            await rest(
                http,
                "POST",
                f"{base}{API}/channels/{channel}/members",
                bob_token,
                {"user_id": bob.id},
            )

        async def bob_posts(channel: int, body: str) -> int:
            msg = await rest(
                http, "POST", f"{base}{API}/channels/{channel}/messages", bob_token, {"body": body}
            )
            return int(msg["id"])

        async with chromium("about:blank", tmp_path / "profile") as dt:
            page = Page(dt)
            for domain in ("Runtime", "Log", "Page"):
                await dt.send(f"{domain}.enable")
            await dt.send(
                "Browser.setDownloadBehavior",
                {"behavior": "allow", "downloadPath": str(downloads), "eventsEnabled": True},
            )
            await dt.send("Page.navigate", {"url": f"{base}/app/"})
            await wait_for(lambda: page.js("document.body?.dataset.ready === '1'"), 10, "the page")

            # Sign in: both channels listed, the stream live, the token in sessionStorage only.
            await page.fill_and_submit("login-form", token=alice_token)
            await wait_for(lambda: _equals(page.status, "live"), 10, "the stream to open")
            await wait_for(lambda: _has_keys(page.channels, {"general", "random"}), 5, "channels")
            assert await page.js("sessionStorage.getItem('herald.token')") == alice_token
            assert await page.js("localStorage.length") == 0
            assert await page.js("document.getElementById('me').textContent") == "alice"

            # A message into the shown channel appears within 2 s.
            await page.open(a)
            await wait_for(lambda: page.js("!document.getElementById('composer').hidden"), 5)
            posted_at = time.monotonic()
            first = await bob_posts(a, "hello alice")
            await wait_for(lambda: _contains(page.shown, (first, "hello alice")), 2, "live message")
            timings["live_message_s"] = time.monotonic() - posted_at

            # Messages into the other channel: its unread badge counts them...
            for text in ("one", "two"):
                await bob_posts(b, text)
            await wait_for(lambda: _unread(page, "random", 2), 2, "unread count 2")
            assert (await page.channels())["general"] == 0
            assert await page.shown() == [(first, "hello alice")]  # not into the shown one
            # ...and drops when it is opened.
            await page.open(b)
            await wait_for(lambda: _unread(page, "random", 0), 2, "unread count cleared")
            await wait_for(lambda: _count(page.shown, 2), 2, "random's messages")

            # A message arriving in the shown channel is marked read with POST /read: no
            # GET of the messages follows it, so only that can keep unread_count at 0.
            xss = await bob_posts(b, XSS)
            await wait_for(lambda: _contains(page.shown, (xss, XSS)), 2, "the XSS message")

            async def api_unread() -> dict[int, int]:
                listing = await rest(http, "GET", f"{base}{API}/channels", alice_token)
                return {int(c["id"]): int(c["unread_count"]) for c in listing["items"]}

            await wait_for(lambda: _value_is(api_unread, b, 0), 5, "POST read of the new message")
            metrics = await (await http.get(f"{base}/metrics")).text()
            read_route = f'route="{API}/channels/{{channel_id}}/read"'
            assert any(read_route in line and '"2xx"' in line for line in metrics.splitlines())

            # The XSS body is text: no element made of it, no dialog.
            node = f"document.querySelector('#messages li[data-id=\"{xss}\"] .body')"
            assert await page.js(f"{node}.textContent") == XSS
            assert await page.js(f"{node}.children.length") == 0
            assert await page.js("document.querySelectorAll('img').length") == 0
            assert dt.of("Page.javascriptDialogOpening") == []

            # A delayed message, scheduled in the page, delivered by the worker.
            await page.fill_and_submit("delay-form", delay_body="see you later", delay_seconds="2")
            await wait_for(
                lambda: page.js("document.querySelectorAll('#pending li').length === 1"), 5
            )
            await wait_for(lambda: _has_body(page.shown, "see you later"), 20, "delayed message")
            await wait_for(
                lambda: page.js("document.querySelectorAll('#pending li').length === 0"), 5
            )

            # An attachment: uploaded from a file input, announced, downloaded again.
            file_input = await dt.evaluate("document.getElementById('upload-file')", by_value=False)
            await dt.send(
                "DOM.setFileInputFiles",
                {"files": [str(upload)], "objectId": file_input["objectId"]},
            )
            await page.js("document.getElementById('upload-form').requestSubmit()")
            await wait_for(
                lambda: _has_body(page.shown, "Attached hello.txt (attachment", prefix=True), 5
            )
            await page.js("document.querySelector('#messages li:last-child button.link').click()")
            saved = downloads / "hello.txt"
            await wait_for(
                lambda: saved.exists() and saved.read_bytes() == ATTACHMENT, 10, "download"
            )

            # The page with every feature used once (docs/img/web-client.png is this).
            shot = await dt.send("Page.captureScreenshot", {"format": "png"})
            png = base64.b64decode(shot["data"])
            (tmp_path / "web-client.png").write_bytes(png)
            target = os.environ.get("HERALD_WEB_SCREENSHOT")
            if target:
                Path(target).write_bytes(png)
            assert png.startswith(b"\x89PNG") and len(png) < 300_000

            # Restart the server: reconnecting shows; what is posted meanwhile arrives once.
            restart_began = time.time()
            assert await server.stop() == 0
            await wait_for(lambda: _equals(page.status, "reconnecting"), 5, "reconnecting state")
            assert await page.js("document.getElementById('status').textContent") == "reconnecting…"
            offline_redis = redis_client(replace(Settings(), redis_url=procs.redis.url))
            try:
                offline = MessageService(
                    db=db,
                    bus=EventBus(offline_redis, replace(Settings(), redis_url=procs.redis.url)),
                    metrics=Metrics.null(),
                )
                during = {
                    c: [
                        int((await offline.post(bob, c, f"while down {c}-{i}"))["id"])
                        for i in range(3)
                    ]
                    for c in (a, b)
                }
            finally:
                await offline_redis.aclose()
            restart_at = time.monotonic()
            server = await procs.serve(**env)
            await wait_for(lambda: _equals(page.status, "live"), 20, "the stream to come back")
            restart_ended = time.time()
            timings["reconnect_s"] = time.monotonic() - restart_at
            await wait_for(lambda: _has_ids(page.shown, during[b]), 5, "messages missed by random")
            await wait_for(
                lambda: _unread(page, "general", 3), 5, "general's missed messages counted"
            )
            after = await bob_posts(b, "back again")
            await wait_for(
                lambda: _contains(page.shown, (after, "back again")), 2, "live after restart"
            )

            async def committed(channel: int) -> list[int]:
                rows = await db.fetch(
                    "SELECT id FROM messages WHERE channel_id = %s ORDER BY id", (channel,)
                )
                return [int(r["id"]) for r in rows]

            # Every message of the channel on screen, exactly once, in order.
            assert [i for i, _ in await page.shown()] == await committed(b)
            await page.open(a)
            await wait_for(lambda: _has_ids(page.shown, during[a]), 5, "general after the restart")
            assert [i for i, _ in await page.shown()] == await committed(a)
            await wait_for(lambda: _unread(page, "general", 0), 2)

            errors = page_errors(dt, (restart_began, restart_ended))
            assert errors == [], [(e.get("url"), e.get("text")) for e in errors]
            assert dt.of("Page.javascriptDialogOpening") == []
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    took = time.monotonic() - started
    print(f"web client test: {took:.1f}s; {timings}")
    assert took < 60, took


async def _equals(read: Any, expected: Any) -> bool:
    return await read() == expected


async def _has_keys(read: Any, keys: set[str]) -> bool:
    return set(await read()) == keys


async def _contains(read: Any, item: Any) -> bool:
    return item in await read()


async def _count(read: Any, n: int) -> bool:
    return len(await read()) == n


async def _has_ids(read: Any, ids: list[int]) -> bool:
    shown = [i for i, _ in await read()]
    return all(i in shown for i in ids)


async def _has_body(read: Any, text: str, *, prefix: bool = False) -> bool:
    return any(body.startswith(text) if prefix else body == text for _, body in await read())


async def _unread(page: Page, name: str, n: int) -> bool:
    return (await page.channels()).get(name) == n


async def _value_is(read: Any, key: Any, value: Any) -> bool:
    return (await read()).get(key) == value
