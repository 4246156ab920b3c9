"""Running the server process: access log without secrets, signals, graceful drain."""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from server.app import init_app
from shared.settings import Settings

logger = logging.getLogger(__name__)

SECRET_PARAMS = re.compile(r"((?:access_token|token)=)[^&\s]*", re.IGNORECASE)


def redact(path_qs: str) -> str:
    """Tokens in query strings (EventSource's ``?access_token=``) never reach a log."""
    return SECRET_PARAMS.sub(r"\1[redacted]", path_qs)


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.1fms",
            request.remote,
            request.method,
            redact(request.path_qs),
            response.status,
            time * 1000,
        )


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT: stop listening, close streams, drain, exit."""
    app = init_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_timeout_s,
        access_log_class=AccessLogger,
        print=lambda _msg: logger.info(
            "Herald listening on http://%s:%d", settings.host, settings.port
        ),
    )
