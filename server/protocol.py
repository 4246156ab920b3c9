"""The HTTP connection layer under the app: what aiohttp's RequestHandler leaves open.

- Header timeout: a connection that has not sent a whole request head within
  HERALD_HEADER_TIMEOUT_S of connecting (or of the first byte of its next request) is
  closed. aiohttp has none of its own; ``keepalive_timeout`` covers idle time only.
- Idle keep-alive connections close after KEEPALIVE_TIMEOUT_S.
- A cap on open connections below RLIMIT_NOFILE (read at start): a connection over it
  gets a canned 503 and is closed at once, so the process never runs out of descriptors
  because of clients (pools, files and the log keep FD_RESERVE).
- Requests the parser rejects get the contract's JSON error, quoting nothing they sent
  (aiohttp's ``handle_error`` answers plain text that echoes the bad bytes).
- Every request gets an id (``X-Request-ID`` from a trusted proxy if well formed, else
  made here), set before the request's task starts so its log lines carry it.
- A live SSE stream takes its connection over (``hand_over``): aiohttp's per-connection
  state (parser, request, response, the connection's task: about 7 KB) is freed while
  the stream lives on, on its bare transport, under a ``HandedOver`` protocol. Such a
  connection still counts against the cap until it ends.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import resource
import uuid
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from server.clientip import is_trusted, parse_ip
from shared.logcontext import REQUEST_ID as REQUEST_ID_VAR
from shared.logcontext import Throttle
from shared.settings import Settings

logger = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT_S = 75.0
# Descriptors kept back from the connection cap for pools, Redis, uploads, the log.
FD_RESERVE_MIN = 64
REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_ID_HEADER = "X-Request-ID"
# What we accept from a proxy: UUIDs, hex, base64-ish ids; nothing that could break a log line.
REQUEST_ID_FORM = re.compile(r"[A-Za-z0-9._~:+=/@-]{1,128}")


def connection_cap(nofile: int | None = None) -> int:
    """The most client connections this process holds: RLIMIT_NOFILE minus a reserve."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        nofile = 1 << 20
    return max(8, nofile - max(FD_RESERVE_MIN, nofile // 10))


def new_request_id() -> str:
    return uuid.uuid4().hex


def json_error_bytes(status: int, reason: str, code: str, message: str, rid: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n"
        f"{REQUEST_ID_HEADER}: {rid}\r\n\r\n"
    )
    return head.encode() + body


# Fixed texts per parser error: the exception's own message quotes the request.
PARSE_MESSAGES: tuple[tuple[type[Exception], int, str, str], ...] = (
    (LineTooLong, 400, "bad_request", "a request line or header is too long"),
    (BadStatusLine, 400, "bad_request", "the request line could not be parsed"),
    (BadHttpMethod, 400, "bad_request", "the request method could not be parsed"),
    (InvalidHeader, 400, "bad_request", "a request header could not be parsed"),
    (BadHttpMessage, 400, "bad_request", "the request could not be parsed"),
)


class HeraldRequestHandler(RequestHandler):
    """One client connection (see the module docstring)."""

    __slots__ = ("_header_handle", "_header_timeout", "_seen_requests")

    def __init__(self, manager: HeraldWebServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = manager.settings.header_timeout_s
        self._header_handle: asyncio.TimerHandle | None = None
        self._seen_requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        assert isinstance(manager, HeraldWebServer)
        if manager.open_connections >= manager.cap:
            # Refused before aiohttp registers it: connection_lost then does nothing.
            self._manager = None
            manager.refused_total += 1
            if manager.refused_total == 1 or manager.should_log_refusal():
                logger.warning(
                    "connection cap reached (%d open, cap %d from RLIMIT_NOFILE): "
                    "%d connections refused so far",
                    manager.open_connections,
                    manager.cap,
                    manager.refused_total,
                )
            # A cast, not an isinstance check: uvloop's transports do not subclass
            # asyncio.Transport (the assert failed there when the cap was reached).
            cast(asyncio.Transport, transport).write(
                json_error_bytes(
                    503,
                    "Service Unavailable",
                    "server_busy",
                    "too many open connections; retry shortly",
                    new_request_id(),
                )
            )
            transport.close()
            return
        super().connection_made(transport)
        self._arm_header_timer()

    @property
    def web_server(self) -> Server | None:
        return self._manager

    def _arm_header_timer(self) -> None:
        self._header_handle = self._loop.call_later(self._header_timeout, self._header_expired)

    def _header_expired(self) -> None:
        self._header_handle = None
        if self._request_count == self._seen_requests and not self._force_close:
            manager = self._manager
            if isinstance(manager, HeraldWebServer):
                manager.header_timeouts_total += 1
            self.force_close()

    def data_received(self, data: bytes) -> None:
        idle = not self._request_in_progress and not self._messages
        if self._header_handle is None and idle and data and self._payload_parser is None:
            # The first byte of a keep-alive connection's next request: its head has
            # HERALD_HEADER_TIMEOUT_S from now.
            self._seen_requests = self._request_count
            self._arm_header_timer()
        super().data_received(data)
        if self._request_count != self._seen_requests and self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None
            self._seen_requests = self._request_count

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The contract's JSON error; nothing of the request is quoted, here or in the log."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        rid = request.get(REQUEST_ID) or new_request_id()
        code, text = "internal_error", f"internal server error (request id {rid})"
        if status < 500:
            code, text = "bad_request", "the request could not be parsed"
            for cls, cls_status, cls_code, cls_text in PARSE_MESSAGES:
                if isinstance(exc, cls):
                    status, code, text = cls_status, cls_code, cls_text
                    break
            manager = self._manager
            if isinstance(manager, HeraldWebServer):
                manager.unparsable_total += 1
            logger.warning("unparsable HTTP request: %s", exc.__class__.__name__)
        elif status == 504:
            code, text = "timeout", f"the request timed out (request id {rid})"
        else:
            logger.error("unhandled error answering a request: %r", exc)
        resp = web.json_response(
            {"error": {"code": code, "message": text}},
            status=status,
            headers={REQUEST_ID_HEADER: rid},
        )
        resp.force_close()
        return resp


class HandedOver(asyncio.Protocol):
    """What holds a connection after ``hand_over``: subclasses say what its reads and
    its end mean (``lost``); the connection cap counts it until then."""

    __slots__ = ("server",)

    def __init__(self) -> None:
        self.server: HeraldWebServer | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.handed_over -= 1
        self.lost(exc)

    def lost(self, exc: BaseException | None) -> None:
        """The connection ended (``exc``: why, if it broke)."""


def hand_over(handler: RequestHandler, protocol: HandedOver) -> asyncio.Transport | None:
    """Give ``handler``'s connection to ``protocol`` for good and let aiohttp forget it,
    or None if it is already closing. Called from a response's ``write_eof``, after
    the response head and body so far were written: aiohttp then ends the request as
    if the peer had left (it writes and closes nothing more), and its objects for this
    connection are freed once the request's task returns. Public attributes only
    (``transport``, ``connection_lost``), so any aiohttp server's handler will do; ours
    also keep the connection counted against the cap."""
    transport = handler.transport
    # Duck-typed: uvloop's transports do not subclass asyncio.Transport.
    if transport is None or not hasattr(transport, "set_protocol") or transport.is_closing():
        return None
    if isinstance(handler, HeraldRequestHandler) and isinstance(
        server := handler.web_server, HeraldWebServer
    ):
        protocol.server = server
        server.handed_over += 1
    transport.set_protocol(protocol)
    handler.transport = None  # aiohttp's teardown below must not close it
    handler.connection_lost(None)
    if not transport.is_reading():  # aiohttp pauses reads behind pipelined requests
        transport.resume_reading()
    return transport


class HeraldWebServer(Server):
    """aiohttp's connection factory, making HeraldRequestHandlers and request ids."""

    def __init__(self, base: Server, settings: Settings, cap: int | None = None) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self._kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT_S)
        self.settings = settings
        self.cap = connection_cap() if cap is None else cap
        self.refused_total = 0
        self.header_timeouts_total = 0
        self.unparsable_total = 0
        # Connections handed over (live SSE streams) and not yet ended.
        self.handed_over = 0
        self._last_refusal_log = 0.0
        self._make_base_request = base.request_factory
        self.request_factory = self._make_request_with_id

    @property
    def open_connections(self) -> int:
        return len(self._connections) + self.handed_over

    def should_log_refusal(self) -> bool:
        """At most one line per second about refused connections."""
        now = self._loop.time()
        if now - self._last_refusal_log >= 1.0:
            self._last_refusal_log = now
            return True
        return False

    def _make_request_with_id(
        self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> BaseRequest:
        request = self._make_base_request(message, payload, protocol, writer, task)
        rid = request[REQUEST_ID] = self.request_id_for(message, protocol)
        # Set in the connection's task just before aiohttp starts the request's own
        # task, which copies this context: the request's log lines carry the id.
        REQUEST_ID_VAR.set(rid)
        return request

    def request_id_for(self, message: Any, protocol: RequestHandler) -> str:
        proposed = message.headers.get(REQUEST_ID_HEADER) if message.headers else None
        if proposed and REQUEST_ID_FORM.fullmatch(proposed):
            transport = protocol.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            addr = parse_ip(peer[0]) if isinstance(peer, tuple) and peer else None
            if addr is not None and is_trusted(addr, self.settings.trusted_proxies):
                return str(proposed)
        return new_request_id()

    def __call__(self) -> RequestHandler:
        return HeraldRequestHandler(self, loop=self._loop, **self._kwargs)


ACCEPT_ERROR = "socket.accept() out of system resource"
_accept_throttle = Throttle(1.0)


def install_accept_error_handler(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs each failed accept at EMFILE with a traceback and retries every
    second per listening socket: one line per second at most, with a count, instead.
    It keeps retrying by itself, so accepting resumes once descriptors free up."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR:
            left_out = _accept_throttle.allow("accept")
            if left_out is not None:
                exc = context.get("exception")
                logger.error(
                    "cannot accept connections: %s (out of file descriptors?); "
                    "%d more since the last line; retrying every second",
                    getattr(exc, "strerror", None) or exc.__class__.__name__,
                    left_out,
                )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class DescriptorProbe:
    """uvloop (libuv) meets EMFILE on accept by accepting and closing the pending
    connections itself, and tells nobody: the selector loop's line above never comes.
    So on uvloop, once a second, one descriptor is opened and closed; while that fails
    for want of descriptors, the same throttled line is logged. Two system calls a
    second; the selector loop needs none of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 1.0) -> None:
        self.loop = loop
        self.interval_s = interval_s
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def start_for(cls, loop: asyncio.AbstractEventLoop) -> DescriptorProbe | None:
        if not type(loop).__module__.startswith("uvloop"):
            return None
        probe = cls(loop)
        probe._handle = loop.call_later(probe.interval_s, probe._tick)
        return probe

    def _tick(self) -> None:
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                left_out = _accept_throttle.allow("accept")
                if left_out is not None:
                    logger.error(
                        "cannot accept connections: %s (out of file descriptors); "
                        "new connections are closed at once; %d more since the last line",
                        exc.strerror,
                        left_out,
                    )
        else:
            os.close(fd)
        self._handle = self.loop.call_later(self.interval_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
