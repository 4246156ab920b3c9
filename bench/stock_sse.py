"""The stock aiohttp-sse pattern, as a reference peer for bench/sse.py and bench/peers.py.

    python bench/stock_sse.py PORT [PING_INTERVAL_S]

A queue and an aiohttp-sse ping task per connection, no manager: what the library's
README and examples do. ``POST /publish`` puts its body on every queue; ``GET /count``
answers how many streams are open.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web
from aiohttp_sse import sse_response


def stock_server(port: int, ping_interval: float = 15.0) -> None:
    subscribers: set[asyncio.Queue[str]] = set()

    async def events(request: web.Request) -> web.StreamResponse:
        queue: asyncio.Queue[str] = asyncio.Queue()
        subscribers.add(queue)
        try:
            async with sse_response(request, ping_interval=ping_interval) as resp:
                await resp.send("{}", event="ready")
                while resp.is_connected():
                    data = await queue.get()
                    await resp.send(data, event="message")
        except ConnectionError:
            pass
        finally:
            subscribers.discard(queue)
        return resp

    async def publish(request: web.Request) -> web.Response:
        data = await request.text()
        for queue in subscribers:
            queue.put_nowait(data)
        return web.Response(text="ok")

    async def count(_request: web.Request) -> web.Response:
        return web.json_response({"active": len(subscribers)})

    app = web.Application()
    app.router.add_get("/events", events)
    app.router.add_post("/publish", publish)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    stock_server(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 15.0)
