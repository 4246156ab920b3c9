"""The environment a ``herald`` subprocess gets in the CLI tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.settings import Settings


def subprocess_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """The test DB and Redis, an own upload folder, and no stray HERALD_* settings."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HERALD_", "CRON_", "DATABASE_", "REDIS_", "PYTEST_", "COV_"))
    }
    return {
        **base,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "HERALD_UPLOAD_DIR": str(tmp_path / "uploads"),
        "PYTHONUNBUFFERED": "1",
        # A loaded CI machine makes start-up statements "slow"; their warning lines would
        # break the one-line-error checks, which are about the error, not the timing.
        "HERALD_SLOW_QUERY_MS": "60000",
    }


def use_in_process(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For ``herald.cli.main()`` called in this process: the same settings as
    :func:`subprocess_env` gives a child, from the real environment, in ``tmp_path``."""
    for key in list(os.environ):
        if key.startswith(("HERALD_", "CRON_", "DATABASE_", "REDIS_")):
            monkeypatch.delenv(key)
    for key in ("DATABASE_URL", "REDIS_URL", "HERALD_UPLOAD_DIR"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(tmp_path)
