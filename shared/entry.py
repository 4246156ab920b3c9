"""What every entry point shares: loading settings, logging set-up, exit codes.

``herald`` (herald/cli.py), ``python -m server`` and ``python -m worker`` each call
:func:`run_command`, so a bad setting or a failure ends every one of them the same way.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from shared.errors import HeraldError
from shared.logcontext import RequestIdFilter
from shared.logformat import TEXT_FORMAT, JsonFormatter, RoutineArqLines
from shared.settings import Settings, SettingsError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def configure_logging(settings: Settings) -> None:
    """The processes' one logging set-up: ``HERALD_LOG_LEVEL`` and ``HERALD_LOG_FORMAT``
    (text or one JSON object per line) on stderr; arq's routine lines at DEBUG."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT + "%(request_tag)s"))
    # Every line logged in a request carries its id (X-Request-ID).
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    arq_worker = logging.getLogger("arq.worker")
    if not any(isinstance(f, RoutineArqLines) for f in arq_worker.filters):
        arq_worker.addFilter(RoutineArqLines())


def fail(message: str, code: int = 1) -> int:
    print(f"herald: {message}", file=sys.stderr)
    return code


def describe(exc: BaseException) -> str:
    """An error in one line: its class and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def run_command(command: Callable[[Settings], int]) -> int:
    """Build the settings once (a bad one: one line naming it, exit 2), run ``command``
    with them, and turn what escapes into an exit code and one line, never a traceback."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        return fail(f"configuration error: {exc}", EXIT_USAGE)
    try:
        return command(settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except HeraldError as exc:
        return fail(exc.message)
    except Exception as exc:
        return fail(describe(exc))
