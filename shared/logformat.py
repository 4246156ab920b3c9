"""Log line formats (``HERALD_LOG_FORMAT``) and the level rules for arq's own lines.

``configure_logging`` in :mod:`shared.entry` installs these; nothing else touches the
logging configuration.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (or a
# filter, such as a request id) and is written as a field of its own.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "request_tag"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``,
    ``message``, then extra fields; ``exception`` holds a traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class RoutineArqLines(logging.Filter):
    """arq logs every job start and finish, and each health-key write, at INFO: with
    cron ticks every few seconds that was ~45 lines a minute on an idle worker. Those of
    cron jobs (routine) become DEBUG; operators' ad-hoc jobs, failures, retries and
    start/stop lines keep their level."""

    ROUTINE = ("%6.2fs → %s(%s)%s", "%6.2fs ← %s ● %s", "recording health: %s")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or record.msg not in self.ROUTINE:
            return True
        if record.msg != "recording health: %s":
            args = record.args if isinstance(record.args, tuple) else ()
            ref = str(args[1]) if len(args) > 1 else ""
            if not ref.startswith("cron:"):
                return True  # a queued job someone asked for: worth a line
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
