"""Request metrics: ``herald_http_requests_total`` and the request-duration histogram.

Labels stay bounded whatever clients send: the route *template*
(``/api/v1/channels/{channel_id}``, "(unmatched)" for 404/405), the status *class*
("2xx".."5xx") and a method from a fixed set. An event stream's handler returns once
the stream is open (replay written, live events flowing; the stream then runs on its
own), so for a stream the histogram shows the time to open it, not its life.
"""

from __future__ import annotations

import time

from aiohttp import web

from server.keys import METRICS
from server.middlewares import Handler

UNMATCHED = "(unmatched)"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(request: web.Request) -> str:
    """The matched route's template, or "(unmatched)" (no route: 404, wrong method: 405)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def status_class(status: int) -> str:
    return f"{min(max(status // 100, 1), 5)}xx"


@web.middleware
async def http_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: sees the status the error middleware chose."""
    start = time.perf_counter()
    route = route_template(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects and the like, answered by aiohttp
        _count(request, route, exc.status, time.perf_counter() - start)
        raise
    except ConnectionResetError:
        raise  # the client left before an answer: nothing was answered
    except Exception:
        _count(request, route, 500, time.perf_counter() - start)
        raise
    _count(request, route, response.status, time.perf_counter() - start)
    return response


def _count(request: web.Request, route: str, status: int, seconds: float) -> None:
    metrics = request.app[METRICS]
    method = request.method if request.method in METHODS else "other"
    metrics.http_requests.labels(method, route, status_class(status)).inc()
    metrics.http_duration.labels(route).observe(seconds)
