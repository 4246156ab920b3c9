"""The ``herald`` command (and ``python -m server|worker``) as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shared.settings import Settings
from tests.cli_helpers import subprocess_env, use_in_process
from tests.conftest import _admin, _dsn
from tests.helpers import wait_for

BIN = Path(sys.executable).parent
HERALD = str(BIN / "herald")
PYTHON = sys.executable
PORTS = range(26000, 27000)
DEAD_DB = "postgresql://postgres@127.0.0.1:1/nowhere"
DEAD_REDIS = "redis://127.0.0.1:1/0"


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def assert_one_line_error(self, code: int, *needles: str) -> None:
        assert self.code == code, (self.code, self.out, self.err)
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err and "Traceback" not in self.out
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    return subprocess_env(settings, tmp_path)


async def run(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 30.0, **extra: str
) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *args,
        env={**env, **extra},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def herald(*args: str) -> list[str]:
    return [HERALD, *args]


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 26000-26999")


async def raw_request(port: int, request: str) -> bytes:
    """Send ``request`` as is; the server's whole answer (it closes after a bad one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0], answer
    return answer


@pytest.fixture
def fresh_url() -> Iterator[str]:
    name = f"herald_cli_{os.getpid()}"
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{name}"')
    yield _dsn(name)
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_migrate_twice(env: dict[str, str], tmp_path: Path, fresh_url: str) -> None:
    first = await run(herald("migrate"), env, tmp_path, DATABASE_URL=fresh_url)
    assert first.code == 0, first.err
    assert first.out.startswith("applied: 0001_foundation.sql")
    second = await run(herald("migrate"), env, tmp_path, DATABASE_URL=fresh_url)
    assert second.code == 0, second.err
    assert second.out.strip() == "database is up to date"
    assert "Traceback" not in first.err + second.err


async def test_users_create_prints_id_and_token_that_work(
    env: dict[str, str], tmp_path: Path, client: TestClient[Any, Any]
) -> None:
    plain, boss = await asyncio.gather(
        run(herald("users", "create", "carol"), env, tmp_path),
        run(herald("users", "create", "boss", "--admin"), env, tmp_path),
    )
    for result, name, is_admin in ((plain, "carol", False), (boss, "boss", True)):
        assert result.code == 0, result.err
        lines = result.out.splitlines()
        assert len(lines) == 2, result.out
        assert lines[0].startswith("id: ") and lines[1].startswith("token: ")
        user_id = int(lines[0].removeprefix("id: "))
        token = lines[1].removeprefix("token: ")
        assert token and " " not in token
        resp = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200
        assert await resp.json() == {"id": user_id, "name": name, "is_admin": is_admin}
    dup = await run(herald("users", "create", "carol"), env, tmp_path)
    dup.assert_one_line_error(1, "carol")
    assert dup.out == ""


async def test_users_create_bad_name(env: dict[str, str], tmp_path: Path) -> None:
    result = await run(herald("users", "create", " "), env, tmp_path)
    result.assert_one_line_error(1, "name")
    result = await run(herald("users", "create", "x" * 81), env, tmp_path)
    result.assert_one_line_error(1, "name")


async def test_bad_setting_exits_2_with_one_line_on_every_entry_point(
    env: dict[str, str], tmp_path: Path
) -> None:
    commands = [
        herald("serve"),
        [PYTHON, "-m", "server"],
        [PYTHON, "-m", "worker"],
        herald("worker"),
        herald("worker", "--check"),
        herald("migrate"),
        herald("users", "create", "zed"),
    ]
    results = await asyncio.gather(*(run(c, env, tmp_path, HERALD_PORT="abc") for c in commands))
    for command, result in zip(commands, results, strict=True):
        assert result.out == "", command
        result.assert_one_line_error(2, "HERALD_PORT")


async def test_each_kind_of_bad_setting_names_its_variable(
    env: dict[str, str], tmp_path: Path
) -> None:
    bad = {
        "HERALD_QUEUE_MAX": "-1",
        "DATABASE_URL": "mysql://x/y",
        "REDIS_URL": "redis://h:port/0",
        "HERALD_TRUSTED_PROXIES": "nope",
        "HERALD_CORS_ORIGINS": "null",
        "HERALD_SSE_HEARTBEAT_S": "nan",
        "HERALD_HOST": "bad host!",
    }
    results = await asyncio.gather(
        *(run(herald("serve"), env, tmp_path, **{var: value}) for var, value in bad.items())
    )
    for var, result in zip(bad, results, strict=True):
        result.assert_one_line_error(2, var)
    both = await run(
        herald("serve"), env, tmp_path, HERALD_QUEUE_MAX="100", HERALD_QUEUE_ALERT="200"
    )
    both.assert_one_line_error(2, "HERALD_QUEUE_ALERT")


async def test_serve_on_a_taken_port_is_one_line_naming_the_settings(
    env: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run(herald("serve"), env, tmp_path, HERALD_PORT=str(port))
    result.assert_one_line_error(1, "HERALD_HOST/HERALD_PORT")
    assert "address already in use" in result.err
    assert "Warning" not in result.err  # what it opened before the bind is closed


async def test_bad_setting_from_dotenv(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HERALD_SSE_MAX_PER_IP=many\n", encoding="utf-8")
    result = await run(herald("worker", "--check"), env, tmp_path)
    result.assert_one_line_error(2, "HERALD_SSE_MAX_PER_IP")
    # The real environment wins over .env.
    result = await run(herald("worker", "--check"), env, tmp_path, HERALD_SSE_MAX_PER_IP="3")
    assert result.code == 1  # a valid config now; just no worker running


async def test_unreachable_services_one_line(env: dict[str, str], tmp_path: Path) -> None:
    results = await asyncio.gather(
        run(herald("migrate"), env, tmp_path, DATABASE_URL=DEAD_DB),
        run(herald("users", "create", "x"), env, tmp_path, DATABASE_URL=DEAD_DB),
        run(herald("worker", "--check"), env, tmp_path, REDIS_URL=DEAD_REDIS),
    )
    for result in results:
        result.assert_one_line_error(1)
        assert "herald:" in result.err


async def test_usage_errors_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    for args in (herald(), herald("nope"), herald("users"), herald("users", "create")):
        result = await run(args, env, tmp_path)
        assert result.code == 2, args
        assert "Traceback" not in result.err


@pytest.fixture
async def worker_proc(env: dict[str, str], tmp_path: Path) -> AsyncIterator[Any]:
    proc = await asyncio.create_subprocess_exec(
        *herald("worker"),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    yield proc
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_worker_check_follows_a_real_worker(
    env: dict[str, str], tmp_path: Path, worker_proc: Any
) -> None:
    async def healthy() -> bool:
        return (await run(herald("worker", "--check"), env, tmp_path)).code == 0

    await wait_for(healthy, 20, "the worker's health-check key", interval=0.1)
    worker_proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(worker_proc.communicate(), 20)
    assert worker_proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    # A stopped worker removes its key.
    after = await run(herald("worker", "--check"), env, tmp_path)
    assert after.code == 1
    assert after.out.strip() == "worker: no fresh health-check key"


async def test_worker_check_without_worker(env: dict[str, str], tmp_path: Path) -> None:
    result = await run(herald("worker", "--check"), env, tmp_path)
    assert result.code == 1
    assert "Traceback" not in result.err


@pytest.mark.parametrize("command", [["herald", "serve"], ["python", "-m", "server"]])
async def test_serve_answers_then_exits_0_on_sigterm(
    env: dict[str, str], tmp_path: Path, command: list[str]
) -> None:
    port = free_port()
    args = herald("serve") if command[0] == "herald" else [PYTHON, "-m", "server"]
    proc = await asyncio.create_subprocess_exec(
        *args,
        env={**env, "HERALD_PORT": str(port), "HERALD_SHUTDOWN_TIMEOUT_S": "1"},
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(up, 20, "the server to answer /health", interval=0.1)
            async with session.get(f"http://127.0.0.1:{port}/api/v1/me") as resp:
                assert resp.status == 401
            # A token in a URL never reaches the access log.
            stream = f"http://127.0.0.1:{port}/api/v1/channels/1/events"
            async with session.get(stream, params={"access_token": "leak-me-not-42"}) as resp:
                assert resp.status == 401
        # Over-long request lines and headers: aiohttp's parser refuses them (400) and
        # used to log a traceback quoting their start, token included.
        await raw_request(
            port, f"GET /api/v1/me?access_token=leak-me-not-43&pad={'x' * 9000} HTTP/1.1\r\n\r\n"
        )
        await raw_request(
            port,
            f"GET /api/v1/me HTTP/1.1\r\nAuthorization: Bearer leak-me-not-44{'y' * 9000}\r\n\r\n",
        )
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode() + err.decode()
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    assert "Warning" not in text  # starting (and stopping) Herald prints no warnings
    assert "/api/v1/me" in text  # the access log is on ...
    assert "leak-me-not-42" not in text  # ... and redacts tokens
    assert "leak-me-not-43" not in text and "leak-me-not-44" not in text
    assert "unparsable HTTP request: LineTooLong" in text


async def test_serve_that_fails_to_start_closes_what_it_opened(settings: Settings) -> None:
    """A resource failing at start (here: after the database pool opened) must not leave
    the pool open: that printed a ResourceWarning under the one-line error."""
    from server.app import init_app
    from server.keys import DB
    from server.runner import HeraldServer

    app = init_app(settings)

    async def redis_down(app: web.Application) -> AsyncIterator[None]:
        raise ConnectionError("redis is down")
        yield  # pragma: no cover

    app.cleanup_ctx.append(redis_down)
    server = HeraldServer(settings, app)
    with pytest.raises(ConnectionError):
        await server.start("127.0.0.1", 0)
    assert app[DB].pool.closed


# The same commands in-process (so coverage sees herald/cli.py; the subprocess tests above
# are the real check). Plain functions: the CLI runs its own event loop.


@pytest.fixture
def cli_env(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_in_process(env, tmp_path, monkeypatch)


def test_main_in_process(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    from herald.cli import main

    assert main(["migrate"]) == 0
    assert capsys.readouterr().out.strip() == "database is up to date"
    assert main(["users", "create", "inproc", "--admin"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in out] == ["id", "token"]
    assert main(["users", "create", "inproc"]) == 1
    assert capsys.readouterr().err.startswith("herald: user 'inproc' exists")
    assert main(["users", "create", "o'brien\"); DROP TABLE users;--"]) == 0
    assert capsys.readouterr().out.startswith("id: ")
    assert main(["users", "create", "o'brien\"); DROP TABLE users;--"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["worker", "--check"]) == 1
    assert capsys.readouterr().out.strip() == "worker: no fresh health-check key"


def test_main_in_process_errors(
    cli_env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from herald.cli import main

    monkeypatch.setenv("HERALD_PORT", "abc")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herald: configuration error: HERALD_PORT:")
    monkeypatch.delenv("HERALD_PORT")
    monkeypatch.setenv("DATABASE_URL", DEAD_DB)
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("herald: OperationalError") and len(err.strip().splitlines()) == 1
