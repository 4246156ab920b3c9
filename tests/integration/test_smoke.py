"""``herald smoke``: passes against a running server and worker; names the step that
fails otherwise."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from herald import smoke as smoke_module
from herald.cli import main
from herald.smoke import Smoke, StepFailed
from worker.app import build_worker


@pytest.fixture
async def running_worker(settings):
    worker = build_worker(settings, handle_signals=False, poll_delay=0.05)
    task = asyncio.create_task(worker.async_run())
    yield worker
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await worker.close()


async def test_smoke_passes_end_to_end(client, alice, running_worker):
    lines: list[str] = []
    url = str(client.make_url("")).rstrip("/")
    await Smoke(url, alice.token, say=lines.append).run()
    steps = [line.split()[1] for line in lines]
    assert steps == ["health", "auth", "channel", "stream", "post", "delayed", "cleanup"]
    assert all(line.startswith("ok ") for line in lines)
    # The throwaway channel is gone again.
    resp = await client.get("/api/v1/channels", headers=alice.headers)
    assert [c for c in (await resp.json())["items"] if c["name"].startswith("smoke-")] == []


async def test_smoke_names_the_failing_step(client, alice, monkeypatch):
    url = str(client.make_url("")).rstrip("/")
    with pytest.raises(StepFailed) as bad_token:
        await Smoke(url, "hrd_not-a-token", say=lambda _: None).run()
    assert bad_token.value.step == "auth"
    # No worker running: the delayed message never arrives; the channel is still removed.
    monkeypatch.setattr(smoke_module, "DELAYED_TIMEOUT_S", 2.5)
    with pytest.raises(StepFailed) as no_worker:
        await Smoke(url, alice.token, say=lambda _: None).run()
    assert no_worker.value.step == "delayed"
    resp = await client.get("/api/v1/channels", headers=alice.headers)
    assert [c for c in (await resp.json())["items"] if c["name"].startswith("smoke-")] == []


def test_smoke_command_line(capsys):
    with pytest.raises(SystemExit) as usage:
        main(["smoke", "--url", "ftp://x", "--token", "t"])
    assert usage.value.code == 2
    # Nothing listens on port 1: the first step fails, exit 1 naming it.
    assert main(["smoke", "--url", "http://127.0.0.1:1", "--token", "t"]) == 1
    assert "FAILED health" in capsys.readouterr().out
