"""Running the server process: access log without secrets, signals, graceful drain.

On SIGTERM or SIGINT: /health and new streams answer 503 at once; the listening socket
closes (a load balancer routes elsewhere, browsers retry a refused connection); idle
keep-alive connections close; every stream gets ``close`` (shutdown, jittered
``reconnect_after_ms``) and up to HERALD_SHUTDOWN_TIMEOUT_S to end, then is dropped;
REST requests in flight get what is left of that window; resources close; exit 0.
A second signal drops the remaining streams at once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import signal
import time
from collections.abc import Sequence

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_server import Server

from server.app import begin_draining, init_app
from server.clientip import IPNetwork, resolve
from server.keys import SETTINGS, STREAMS
from server.protocol import DescriptorProbe, HeraldWebServer, install_accept_error_handler
from shared.entry import configure_logging, describe, fail, run_command
from shared.eventloop import loop_name
from shared.eventloop import run as run_on_loop
from shared.sdnotify import Notifier
from shared.settings import Settings

logger = logging.getLogger(__name__)

SECRET_PARAMS = re.compile(r"((?:access_token|token)=)[^&\s]*", re.IGNORECASE)
# REST requests in flight always get at least this long after the streams drained.
REST_GRACE_S = 0.25


def redact(path_qs: str) -> str:
    """Tokens in query strings (EventSource's ``?access_token=``) never reach a log."""
    return SECRET_PARAMS.sub(r"\1[redacted]", path_qs)


class AccessLogger(AbstractAccessLogger):
    """One line per answer. The client is shown as the per-IP limits see it: through
    trusted proxies' X-Forwarded-For (server/clientip.py), from the peer name aiohttp
    kept at the request's start (a stream is logged when it ends, its transport gone).
    aiohttp builds the logger itself, so the proxies come as a class attribute
    (:func:`access_logger_for`); a request aiohttp could not parse has no app to ask."""

    trusted: tuple[IPNetwork, ...] = ()

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # A request aiohttp could not parse carries a plain dict of headers, if any.
        getall = getattr(request.headers, "getall", None)
        forwarded = getall("X-Forwarded-For", []) if getall is not None else []
        client = resolve(request.remote, forwarded, self.trusted)
        self.logger.info(
            "%s %s %s %d %.1fms",
            client,
            request.method,
            redact(request.path_qs),
            response.status,
            time * 1000,
        )


def access_logger_for(settings: Settings) -> type[AccessLogger]:
    return type("AccessLogger", (AccessLogger,), {"trusted": settings.trusted_proxies})


class UnparsableRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback whose message quotes the
    start of the bad line, so an over-long URL or header put its token in the log. One
    line naming the error class instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "unparsable HTTP request: %s", (exc.__class__.__name__,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# The connection handlers' logger (aiohttp's default is "aiohttp.server").
http_logger = logging.getLogger("server.http")
http_logger.addFilter(UnparsableRequestFilter())


class DrainingRunner(web.AppRunner):
    """aiohttp's shutdown order (stop listening, close idle connections, on_shutdown,
    wait for handlers, cancel, cleanup) with one deadline for all of it: on_shutdown
    drains the streams; requests still running get only what remains of the window."""

    async def _make_server(self) -> Server:
        # Our connection layer (server/protocol.py) over the app's own request handling.
        return HeraldWebServer(await super()._make_server(), self.app[SETTINGS])

    async def shutdown(self) -> None:
        started = time.monotonic()
        await super().shutdown()
        window = self.app[SETTINGS].shutdown_timeout_s
        # aiohttp reads this attribute for its wait on running handlers (run_app sets it
        # the same way); set here, the total stays near HERALD_SHUTDOWN_TIMEOUT_S.
        self._shutdown_timeout = max(REST_GRACE_S, started + window - time.monotonic())


class HeraldServer:
    """One server process's HTTP side: start listening, later drain and stop."""

    def __init__(self, settings: Settings, app: web.Application | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else init_app(settings)
        self.runner = DrainingRunner(
            self.app,
            access_log_class=access_logger_for(settings),
            logger=http_logger,
            shutdown_timeout=settings.shutdown_timeout_s,
            handle_signals=False,
        )
        self.port = 0

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        try:
            # Inside the try: a resource that fails to open (Redis down) must not leave
            # those opened before it (the database pool) unclosed.
            await self.runner.setup()
            site = web.TCPSite(
                self.runner,
                self.settings.host if host is None else host,
                self.settings.port if port is None else port,
                reuse_address=True,
                # A supervised process shares its port with its siblings: the kernel
                # spreads new connections over them (server/supervisor.py).
                reuse_port=self.settings.process_index is not None,
            )
            await site.start()
        except BaseException:
            await self.runner.cleanup()
            raise
        for address in self.runner.addresses:
            self.port = int(address[1])
            logger.info(
                "Herald listening on http://%s:%d (pid %d, %s loop)",
                address[0],
                address[1],
                os.getpid(),
                loop_name(),
            )

    async def stop(self) -> None:
        """The drain described above; returns when everything is closed."""
        begin_draining(self.app)
        await self.runner.cleanup()

    def drop_streams(self) -> None:
        for stream in list(self.app[STREAMS].streams.values()):
            stream.abort()


def tune_gc() -> None:
    """Start-up objects (modules, app, pools) move to a generation the collector never
    scans, and the first generation collects less often: with thousands of streams
    open, full passes over objects that never die were the fan-out tail (see
    docs/sse.md, bench/sse.py)."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(10_000, second, third)


async def run(settings: Settings) -> None:
    notifier = Notifier.from_settings(settings)
    install_accept_error_handler(asyncio.get_running_loop())
    probe = DescriptorProbe.start_for(asyncio.get_running_loop())
    server = HeraldServer(settings)
    await server.start()
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: dropping open streams now", signal.Signals(signum).name)
            server.drop_streams()
            return
        logger.info("%s: draining", signal.Signals(signum).name)
        notifier.stopping("draining streams")
        begin_draining(server.app)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    # Listening, and a stop from now on drains: systemd (Type=notify) calls the unit
    # started only now, and starts the units ordered after it.
    notifier.ready(f"listening on http://{settings.host}:{server.port}")
    try:
        await stop.wait()
        await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if probe is not None:
            probe.stop()
        await notifier.close()
    logger.info("Herald stopped")


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return (the process exits 0); on uvloop
    unless HERALD_UVLOOP=0 (shared/eventloop.py)."""
    run_on_loop(run(settings), settings)


def serve_command(settings: Settings) -> int:
    """``herald serve``: exit 0 after the drain; 1 with one line if it cannot listen.
    With HERALD_PROCESSES above 1, a supervisor of that many server processes."""
    configure_logging(settings)
    try:
        if settings.process_count > 1 and settings.process_index is None:
            from server.supervisor import Supervisor

            return run_on_loop(Supervisor(settings).run(), settings)
        serve(settings)
    except OSError as exc:  # bind failed: address in use, not local, name unknown
        reason = exc.strerror or describe(exc)
        return fail(
            f"cannot listen on {settings.host}:{settings.port} (HERALD_HOST/HERALD_PORT): {reason}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server``: the same as ``herald serve``."""
    argparse.ArgumentParser(prog="python -m server", description=serve_command.__doc__).parse_args(
        argv
    )
    return run_command(serve_command)
