"""Logging set-up (shared/entry.py configure_logging, shared/logformat.py): formats,
levels, arq's routine lines at DEBUG; and the access log's client address."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from server.runner import access_logger_for
from shared.entry import configure_logging
from shared.settings import Settings
from worker.app import build_worker


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def base() -> Settings:
    return Settings.from_env(env={}, dotenv=None)


def test_json_lines_carry_time_level_logger_message_and_extras(capsys, restore_logging):
    configure_logging(replace(base(), log_format="json"))
    log = logging.getLogger("herald.test")
    log.info("job %s done", "j-1", extra={"job_id": "j-1", "attempt": 2})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("it failed")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["level"] == "info" and first["logger"] == "herald.test"
    assert first["message"] == "job j-1 done"
    assert first["job_id"] == "j-1" and first["attempt"] == 2
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["level"] == "error" and "ValueError: bad" in second["exception"]


def test_text_format_and_levels(capsys, restore_logging):
    configure_logging(replace(base(), log_level="warning"))
    log = logging.getLogger("herald.test")
    log.info("hidden")
    log.warning("shown %d", 1)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("WARNING herald.test: shown 1")
    configure_logging(replace(base(), log_level="debug"))
    log.debug("now visible")
    assert "DEBUG herald.test: now visible" in capsys.readouterr().err


def arq_line(msg: str, *args: object) -> None:
    logging.getLogger("arq.worker").info(msg, *args)


def test_arq_routine_lines_are_debug_and_the_rest_stay_info(capsys, restore_logging):
    configure_logging(base())
    arq_line("%6.2fs → %s(%s)%s", 0.01, "cron:deliver_delayed:1:2", "", "")
    arq_line("%6.2fs ← %s ● %s", 0.02, "cron:deliver_delayed:1:2", "{}")
    arq_line("recording health: %s", "Dec-01 j_complete=3")
    arq_line("%6.2fs → %s(%s)%s", 0.01, "abc123:orphan_scan", "dry_run=True", "")
    arq_line("Starting worker for %d functions: %s", 3, "a, b, c")
    err = capsys.readouterr().err
    assert "cron:" not in err and "recording health" not in err
    assert "INFO arq.worker:" in err and "abc123:orphan_scan" in err and "Starting worker" in err
    configure_logging(replace(base(), log_level="debug"))
    arq_line("%6.2fs → %s(%s)%s", 0.01, "cron:deliver_delayed:1:2", "", "")
    assert "DEBUG arq.worker:" in capsys.readouterr().err


async def test_an_idle_workers_cron_ticks_write_no_info_lines(settings, restore_logging):
    configure_logging(settings)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep(logging.INFO)
    logging.getLogger().addHandler(keep)
    # Burst mode runs the run_at_startup cron jobs (delivery sweep, queue sample) once.
    worker = build_worker(settings, burst=True, handle_signals=False, poll_delay=0.05)
    try:
        await worker.async_run()
    finally:
        await worker.close()
    assert worker.jobs_complete >= 2
    # arq's per-job lines ("0.01s → cron:…", "← cron:… ●") and its health-key writes.
    routine = [r.getMessage() for r in seen if r.name == "arq.worker" and "s → " in r.getMessage()]
    routine += [r.getMessage() for r in seen if " ● " in r.getMessage() or "recording" in r.msg]
    assert routine == []
    infos = [r.getMessage() for r in seen if r.levelno == logging.INFO]
    assert len(infos) < 10, infos  # start/stop and statement ids, not per tick


def mocked(headers: dict[str, str]) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.return_value = ("127.0.0.1", 40000)
    return make_mocked_request("GET", "/health", headers=headers, transport=transport)


@pytest.mark.parametrize(
    ("trusted", "expected"), [("127.0.0.1/32", "203.0.113.9"), (None, "127.0.0.1")]
)
def test_access_log_shows_the_client_through_trusted_proxies(trusted, expected):
    logger = mock.Mock()
    request = mocked({"X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
    proxies = (ipaddress.ip_network(trusted),) if trusted else ()
    access = access_logger_for(replace(base(), trusted_proxies=proxies))
    access(logger, "").log(request, web.Response(), 0.002)
    _fmt, address, *_ = logger.info.call_args.args
    assert address == expected
