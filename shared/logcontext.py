"""The request id every log line of a request carries, and log-volume helpers.

The server sets :data:`REQUEST_ID` before a request's task starts (server/protocol.py),
so the task's context, and every line logged in it, has the id; the filter puts it on
each record as ``request_id`` ("-" outside a request) and ``request_tag`` (the text
format's `` request_id=ID`` suffix, empty outside a request).
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

# Repeated failures of one kind during an outage (a publish, a cache read, the database)
# are logged at most once per this many seconds, with the count of those left out.
FAILURE_LOG_INTERVAL_S = 10.0

REQUEST_ID: ContextVar[str | None] = ContextVar("herald_request_id", default=None)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get() or "-"
        rid = getattr(record, "request_id", "-")
        record.request_tag = f" request_id={rid}" if rid != "-" else ""
        return True


class Throttle:
    """Repeated failures of one kind: the first logged at once, then at most one line
    per ``interval`` seconds, saying how many were left out since the last line."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        """None: stay quiet; else the number left out since the last line of ``kind``."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._suppressed.pop(kind, 0)
