"""Middlewares: CORS, contract JSON errors, bearer-token auth; plus the JSON body reader."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg2
import redis.exceptions
from aiohttp import web

from server.clientip import client_ip
from server.keys import AUTH_LIMIT, METRICS, SETTINGS, UNAVAILABLE_LOG, USERS
from server.protocol import REQUEST_ID
from shared.constants import API_PREFIX
from shared.errors import (
    BackendUnavailable,
    HeraldError,
    PayloadTooLarge,
    RetryLater,
    Unauthorized,
    code_for_status,
)
from shared.models import Credential, User

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
USER = web.RequestKey("user", User)
CREDENTIAL = web.RequestKey("credential", Credential)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


# Errors that mean "PostgreSQL or Redis is not answering", not "this request is bad".
DEPENDENCY_ERRORS: tuple[type[Exception], ...] = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    ConnectionResetError,
    TimeoutError,
    *DEPENDENCY_ERRORS,
)
DEPENDENCY_RETRY_AFTER_S = 5


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes ``{"error": {code, message}}``; never a traceback or HTML.
    A 5xx message names the request id, so an operator can find its log lines."""
    resp = await _errors_as_json(request, handler)
    if (
        resp.status >= 500
        and isinstance(resp, web.Response)
        and resp.content_type == ("application/json")
    ):
        rid = request.get(REQUEST_ID)
        body = resp.body
        if rid is not None and isinstance(body, bytes):
            try:
                doc = json.loads(body)
                doc["error"]["message"] += f" (request id {rid})"
            except (ValueError, KeyError, TypeError):
                return resp
            resp.body = json.dumps(doc).encode()
    return resp


async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BackendUnavailable as exc:
        _log_unavailable(request, exc.__cause__ or exc)
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except HeraldError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == PayloadTooLarge.status:
            return error_response(exc.status, PayloadTooLarge.code, "request body is too large")
        code = code_for_status(exc.status)
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return error_response(exc.status, code, exc.reason or code, headers)
    except UNAVAILABLE_ERRORS as exc:
        if isinstance(exc, ConnectionResetError) and (
            request.transport is None or request.transport.is_closing()
        ):
            raise  # the client is gone; nothing to answer
        # PostgreSQL or Redis unreachable (or no pooled connection in time): the request
        # was fine, the server cannot serve it now.
        _log_unavailable(request, exc)
        return error_response(
            503,
            "service_unavailable",
            "a backing service is unavailable; retry shortly",
            {"Retry-After": str(DEPENDENCY_RETRY_AFTER_S)},
        )
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error")


def _log_unavailable(request: web.Request, exc: BaseException) -> None:
    """One line per interval for an outage's 503s, with how many were left out. The
    class name only: driver messages carry hosts."""
    throttle = request.app.get(UNAVAILABLE_LOG)
    left_out = throttle.allow("unavailable") if throttle is not None else 0
    if left_out is not None:
        logger.warning(
            "dependency unavailable (%s) on %s %s; answering 503 (%d more not logged"
            " since the last line)",
            exc.__class__.__name__,
            request.method,
            request.path,
            left_out,
        )


def bearer_token(request: web.Request, *, allow_query: bool) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if allow_query:
        return request.query.get("access_token") or None
    return None


OPENAPI_PATH = f"{API_PREFIX}/openapi.json"
EVENTS_ROUTE = f"{API_PREFIX}/channels/{{channel_id}}/events"
# Both streams: a browser's EventSource cannot set headers on either.
STREAM_ROUTES = frozenset({EVENTS_ROUTE, f"{API_PREFIX}/events"})


def is_events_route(request: web.Request) -> bool:
    # The matched route, not the path's shape: GET /channels/events is the detail route
    # (id "events") and must not take a token from the URL.
    resource = request.match_info.route.resource
    return request.method == "GET" and resource is not None and resource.canonical in STREAM_ROUTES


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every ``/api/v1`` route needs a user token, except the cron routes (their own
    secret) and ``openapi.json``. ``?access_token=`` counts on the SSE routes only."""
    path = request.path
    if (
        not path.startswith(API_PREFIX + "/")
        or path.startswith(f"{API_PREFIX}/cron/")
        or path == OPENAPI_PATH  # the API's description is public
        or request.match_info.http_exception is not None  # no such route: 404/405 first
    ):
        return await handler(request)
    token = bearer_token(request, allow_query=is_events_route(request))
    if token is None:
        raise Unauthorized("missing bearer token")
    # Checked before the token, so a limited address learns nothing from its guesses
    # (a good token is refused too; see shared/services/auth_limit.py). The cache read
    # runs beside the check (one round trip of waiting, not two) and is used only
    # after it; PostgreSQL is asked only for an address that is not limited.
    limiter, users = request.app[AUTH_LIMIT], request.app[USERS]
    address = client_ip(request, request.app[SETTINGS].trusted_proxies)
    retry_after, cached = await asyncio.gather(
        limiter.retry_after(address), users.cached_credential(token)
    )
    if retry_after is not None:
        request.app[METRICS].auth_throttled.inc()
        raise RetryLater(
            "too many bad tokens from this address; retry later",
            code="too_many_auth_failures",
            retry_after=retry_after,
            status=429,
        )
    cred = cached or await users.authenticate(token, cache_read=False)
    if cred is None:  # unknown, revoked or expired: one answer for all three
        await limiter.record_failure(address)
        raise Unauthorized("invalid token")
    request[USER] = cred.user
    request[CREDENTIAL] = cred
    return await handler(request)


def current_credential(request: web.Request) -> Credential:
    cred: Credential | None = request.get(CREDENTIAL)
    if cred is None:
        raise Unauthorized("missing bearer token")
    return cred


def current_user(request: web.Request) -> User:
    user: User | None = request.get(USER)
    if user is None:
        raise Unauthorized("missing bearer token")
    return user


CORS_METHODS = "GET, POST, PATCH, DELETE"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"


def allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if not origin or not request.path.startswith(API_PREFIX):
        return None
    # Exact, as the contract says: browsers send scheme and host in lower case, and the
    # configured origins are stored lower-cased.
    return origin if origin in request.app[SETTINGS].cors_origins else None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers preflights; the response headers are added in ``on_response_prepare`` so
    streams and errors carry them too."""
    if request.method == "OPTIONS" and request.path.startswith(API_PREFIX):
        headers = {"Vary": "Origin"}
        origin = allowed_origin(request)
        if origin is not None:
            headers.update(
                {
                    "Access-Control-Allow-Methods": CORS_METHODS,
                    "Access-Control-Allow-Headers": CORS_HEADERS,
                    "Access-Control-Max-Age": "600",
                }
            )
        return web.Response(status=204, headers=headers)
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    if not request.path.startswith(API_PREFIX):
        return
    # Add to a Vary the handler set (e.g. Accept-Encoding) rather than skip it: a cache
    # must key on Origin whatever else varies.
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
    elif "origin" not in {v.strip().lower() for v in vary.split(",")} and vary.strip() != "*":
        response.headers["Vary"] = f"{vary}, Origin"
    origin = allowed_origin(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (RFC 8259) does not.
    raise ValueError(f"{name} is not JSON")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON: 413 over the size limit, 400 ``invalid_json`` if it
    does not parse."""
    if request.content_length is not None and request.content_length > request.client_max_size:
        raise PayloadTooLarge("request body is too large")
    raw = await request.read()
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    # ValueError covers both decode errors and int() refusing a number of more than
    # 4300 digits, which json raises as a plain ValueError.
    except (ValueError, RecursionError):
        raise HeraldError("request body is not valid JSON", code="invalid_json") from None
