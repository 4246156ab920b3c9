"""shared/tasks.py: stopping background tasks never swallows the caller's cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.tasks import cancel_and_wait


async def test_cancels_and_waits_and_logs_a_failed_task(caplog):
    async def forever() -> None:
        await asyncio.Event().wait()

    async def fails() -> None:
        raise RuntimeError("boom")

    a = asyncio.create_task(forever(), name="forever")
    b = asyncio.create_task(fails(), name="fails")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="shared.tasks"):
        await cancel_and_wait(a, None, b)
    assert a.cancelled() and b.done()
    assert "background task fails failed" in caplog.text


async def test_the_callers_own_cancellation_is_not_swallowed():
    started = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()  # takes its time to end

    inner = asyncio.create_task(stubborn())
    await started.wait()
    stopper = asyncio.create_task(cancel_and_wait(inner))
    await asyncio.sleep(0)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    inner.cancel()
    await asyncio.wait([inner])


async def test_a_task_that_loses_a_cancel_gets_another(monkeypatch):
    """As when a library turns the stop's cancel into its own timeout and the loop goes
    on: the next cancel, a moment later, ends it; the owner's shutdown does not hang."""
    monkeypatch.setattr("shared.tasks.RECANCEL_S", 0.05)
    swallowed = 0

    async def loses_one() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # the first cancel is lost, as in the library case

    task = asyncio.create_task(loses_one())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.cancelled() and swallowed == 1
