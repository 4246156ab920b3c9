"""shared/eventloop.py: asyncio's loop by default, uvloop for the daemons with HERALD_UVLOOP=1.

(``herald serve`` itself on both loops: tests/integration/test_serve_processes.py.)"""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from shared.eventloop import loop_factory, loop_name, run
from shared.settings import Settings


def settings(**env: str) -> Settings:
    return Settings.from_env(env=env, dotenv=None)


async def which_loop() -> str:
    return loop_name()


def test_herald_uvloop_1_runs_uvloop() -> None:
    on = settings(HERALD_UVLOOP="1")
    assert loop_factory(on) is uvloop.new_event_loop
    assert run(which_loop(), on) == "uvloop"


def test_the_standard_loop_is_the_default() -> None:
    # Off by default: aiopg on uvloop answered 500 after a PostgreSQL statement timed out
    # (a reused descriptor meets uvloop's closed poll handle; tests/faults/
    # test_outage_postgres.py with HERALD_UVLOOP=1 shows it).
    for off in (settings(), settings(HERALD_UVLOOP="0")):
        assert loop_factory(off) is None
        assert run(which_loop(), off) == "asyncio"


def test_without_uvloop_installed_the_standard_loop_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import raises ImportError
    with caplog.at_level("INFO", logger="shared.eventloop"):
        assert loop_factory(settings(HERALD_UVLOOP="1")) is None
    assert "uvloop is not installed" in caplog.text


def test_loop_name_of_a_given_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert loop_name(loop) == "asyncio"
    finally:
        loop.close()
