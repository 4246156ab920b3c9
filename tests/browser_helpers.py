"""Driving Debian's headless Chromium over the DevTools protocol (aiohttp's websocket
client), for the browser tests: start it on a page, evaluate JavaScript in it."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import wait_for

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs headless Chromium: apt-get update && apt-get install -y chromium",
)


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
    """One page's DevTools session: commands answered by id; events (``method`` without
    an ``id``) collected in ``events`` for the test to read. A JavaScript dialog is
    recorded and dismissed at once, so it cannot block the page."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        async for frame in self.ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            msg = json.loads(frame.data)
            waiting = self._waiting.pop(msg.get("id", -1), None)
            if waiting is not None:
                if not waiting.done():
                    waiting.set_result(msg)
                continue
            self.events.append(msg)
            if msg.get("method") == "Page.javascriptDialogOpening":
                self.next_id += 1
                await self.ws.send_json(
                    {
                        "id": self.next_id,
                        "method": "Page.handleJavaScriptDialog",
                        "params": {"accept": False},
                    }
                )

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one DevTools command; its ``result`` (an ``error`` answer raises)."""
        self.next_id += 1
        waiting: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self.next_id] = waiting
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params or {}})
        async with asyncio.timeout(10):
            msg = await waiting
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        result: dict[str, Any] = msg["result"]
        return result

    async def evaluate(self, expression: str, *, by_value: bool = True) -> Any:
        """The expression's value (awaited if it is a promise); an exception raises."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": by_value, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        if not by_value:
            return result["result"]
        return result["result"].get("value")

    def of(self, method: str) -> list[dict[str, Any]]:
        """The ``params`` of every ``method`` event received so far."""
        return [e.get("params", {}) for e in self.events if e.get("method") == method]


@asynccontextmanager
async def chromium(
    url: str, profile: Path, *, window: tuple[int, int] = (1024, 640)
) -> AsyncIterator[DevTools]:
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
            f"--window-size={window[0]},{window[1]}",
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
                devtools = DevTools(ws)
                devtools.start()
                try:
                    yield devtools
                finally:
                    await devtools.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
