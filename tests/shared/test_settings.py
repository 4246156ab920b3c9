"""Settings.from_env: defaults, good values, every kind of bad value, and ``.env``."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from shared.settings import Settings, SettingsError, read_dotenv

DEFAULTS = {
    "database_url": "postgresql://localhost/herald",
    "redis_url": "redis://localhost:6379/0",
    "host": "127.0.0.1",
    "port": 8080,
    "upload_dir": Path("./var/uploads"),
    "max_upload_bytes": 26_214_400,
    "cron_secret": None,
    "sse_heartbeat_s": 15.0,
    "sse_stale_s": 30.0,
    "sse_max_per_ip": 5,
    "sse_max_connections": 1000,
    "shutdown_timeout_s": 5.0,
    "trusted_proxies": (),
    "queue_max": 10_000,
    "queue_alert": 8_000,
    "queue_max_per_user": 500,
    "cleanup_batch": 1000,
    "queue_retention_s": 86_400,
    "sse_buffer_bytes": 1_048_576,
    "cache_ttl_s": 300,
    "slow_query_ms": 100.0,
    "orphan_grace_s": 3600,
    "cors_origins": frozenset(),
    "log_format": "text",
    "log_level": "info",
    "worker_metrics_port": 9091,
    "web_app": False,
    "uvloop": False,
    "processes": 1,
    "process_index": None,
    "redis_sentinels": (),
    "redis_sentinel_master": "herald",
}

# Every contract variable with a good non-default value and the field it lands in.
GOOD = [
    ("DATABASE_URL", "postgresql://u:p@db.example:5433/h", "database_url", None),
    ("DATABASE_URL", "postgres://db/h", "database_url", None),
    ("DATABASE_URL", "postgresql:///h?host=/var/run/postgresql", "database_url", None),
    ("DATABASE_URL", "postgresql:///herald", "database_url", None),
    # libpq's multi-host forms (it tries each; target_session_attrs picks a writable one).
    (
        "DATABASE_URL",
        "postgresql://u:p@db-a:5432,db-b:5433/herald?target_session_attrs=read-write",
        "database_url",
        None,
    ),
    ("DATABASE_URL", "postgresql://db-a,db-b:5432,[::1]:5433/herald", "database_url", None),
    (
        "DATABASE_URL",
        "postgresql:///herald?host=db-a,db-b&port=5432,5433&target_session_attrs=read-write",
        "database_url",
        None,
    ),
    ("REDIS_URL", "redis://:pw@cache:6380/3", "redis_url", None),
    ("REDIS_URL", "rediss://cache/1", "redis_url", None),
    ("REDIS_URL", "unix:///run/redis.sock", "redis_url", None),
    (
        "REDIS_SENTINELS",
        " 10.0.0.5:26379, sentinel-b.internal:26380 ,[::1]:5000,",
        "redis_sentinels",
        (("10.0.0.5", 26379), ("sentinel-b.internal", 26380), ("::1", 5000)),
    ),
    ("REDIS_SENTINELS", "s1,s1:26379", "redis_sentinels", (("s1", 26379),)),
    ("REDIS_SENTINELS", "", "redis_sentinels", ()),
    ("REDIS_SENTINEL_MASTER", "cache-1.prod", "redis_sentinel_master", None),
    ("HERALD_HOST", "0.0.0.0", "host", None),  # noqa: S104
    ("HERALD_PORT", "0", "port", 0),
    ("HERALD_PORT", "65535", "port", 65535),
    ("HERALD_UPLOAD_DIR", "/srv/herald/files", "upload_dir", Path("/srv/herald/files")),
    ("HERALD_MAX_UPLOAD_BYTES", "1024", "max_upload_bytes", 1024),
    ("CRON_SECRET", "s3cret", "cron_secret", "s3cret"),
    ("HERALD_SSE_HEARTBEAT_S", "0.5", "sse_heartbeat_s", 0.5),
    ("HERALD_SSE_STALE_S", "2", "sse_stale_s", 2.0),
    ("HERALD_SSE_MAX_PER_IP", "7", "sse_max_per_ip", 7),
    ("HERALD_SSE_MAX_CONNECTIONS", "20000", "sse_max_connections", 20000),
    ("HERALD_SHUTDOWN_TIMEOUT_S", "0", "shutdown_timeout_s", 0.0),
    ("HERALD_SHUTDOWN_TIMEOUT_S", "20", "shutdown_timeout_s", 20.0),
    ("HERALD_QUEUE_MAX", "9000", "queue_max", 9000),
    ("HERALD_QUEUE_MAX_PER_USER", "3", "queue_max_per_user", 3),
    ("HERALD_CLEANUP_BATCH", "50", "cleanup_batch", 50),
    ("HERALD_QUEUE_RETENTION_S", "0", "queue_retention_s", 0),
    ("HERALD_SSE_BUFFER_BYTES", "65536", "sse_buffer_bytes", 65536),
    ("HERALD_CACHE_TTL_S", "0", "cache_ttl_s", 0),
    ("HERALD_SLOW_QUERY_MS", "2.5", "slow_query_ms", 2.5),
    ("HERALD_ORPHAN_GRACE_S", "60", "orphan_grace_s", 60),
    ("HERALD_LOG_FORMAT", "json", "log_format", "json"),
    ("HERALD_LOG_FORMAT", " JSON ", "log_format", "json"),
    ("HERALD_LOG_LEVEL", "debug", "log_level", "debug"),
    ("HERALD_LOG_LEVEL", "Warning", "log_level", "warning"),
    ("HERALD_LOG_LEVEL", "error", "log_level", "error"),
    ("HERALD_WORKER_METRICS_PORT", "0", "worker_metrics_port", 0),
    ("HERALD_WORKER_METRICS_PORT", "19091", "worker_metrics_port", 19091),
    ("HERALD_WEB_APP", "1", "web_app", True),
    ("HERALD_WEB_APP", " True ", "web_app", True),
    ("HERALD_WEB_APP", "off", "web_app", False),
    ("HERALD_UVLOOP", "0", "uvloop", False),
    ("HERALD_UVLOOP", " off ", "uvloop", False),
    ("HERALD_UVLOOP", "False", "uvloop", False),
    ("HERALD_UVLOOP", "1", "uvloop", True),
    ("HERALD_UVLOOP", "yes", "uvloop", True),
    ("HERALD_PROCESSES", "4", "processes", 4),
    ("HERALD_PROCESSES", "0", "processes", 0),
    ("HERALD_PROCESSES", "auto", "processes", 0),
    ("HERALD_PROCESSES", " AUTO ", "processes", 0),
]

BAD = [
    ("HERALD_LOG_FORMAT", "xml"),
    ("HERALD_LOG_LEVEL", "verbose"),
    ("HERALD_LOG_LEVEL", "critical"),
    ("HERALD_WORKER_METRICS_PORT", "70000"),
    ("HERALD_WORKER_METRICS_PORT", "-1"),
    ("HERALD_WORKER_METRICS_PORT", "ninety"),
    ("HERALD_HOST", "bad host!"),
    ("HERALD_HOST", "-leading-dash"),
    ("HERALD_HOST", "a..b"),
    ("DATABASE_URL", "not a url"),
    ("DATABASE_URL", "mysql://db/h"),
    ("DATABASE_URL", "postgresql://db:port/h"),
    ("DATABASE_URL", "postgresql://[::1/h"),
    ("DATABASE_URL", "postgresql://"),
    ("DATABASE_URL", "postgresql://db-a:x,db-b:5432/h"),
    ("DATABASE_URL", "postgresql://db-a:5432,db-b:99999/h"),
    ("DATABASE_URL", "postgresql://db-a:5432,,db-b/h"),
    ("REDIS_URL", "http://cache:6379/0"),
    ("REDIS_URL", "redis://cache:99999/0"),
    ("REDIS_URL", "redis://"),
    # arq and redis-py turn these into a bare ValueError naming nothing.
    ("REDIS_URL", "redis://cache:6379/abc"),
    ("REDIS_URL", "redis://cache:6379/"),
    ("REDIS_URL", "redis://cache:6379/0/1"),
    ("REDIS_URL", "redis://cache:6379/-1"),
    ("REDIS_URL", "redis://cache:6379?db=x"),
    ("REDIS_URL", "unix:///run/redis.sock?db=one"),
    ("REDIS_SENTINELS", "s1:port"),
    ("REDIS_SENTINELS", "s1:0"),
    ("REDIS_SENTINELS", "s1:65536"),
    ("REDIS_SENTINELS", "s1:-1"),
    ("REDIS_SENTINELS", "s1:"),
    ("REDIS_SENTINELS", ":26379"),
    ("REDIS_SENTINELS", "bad host!:26379"),
    ("REDIS_SENTINELS", "ok:26379,-dash:26379"),
    ("REDIS_SENTINELS", "::1:26379"),
    ("REDIS_SENTINELS", "[nope]:26379"),
    ("REDIS_SENTINELS", "redis://s1:26379"),
    ("REDIS_SENTINELS", "s1 s2:26379"),
    ("REDIS_SENTINEL_MASTER", "my master"),
    ("REDIS_SENTINEL_MASTER", "a,b"),
    ("HERALD_PORT", "abc"),
    ("HERALD_PORT", "-1"),
    ("HERALD_PORT", "65536"),
    ("HERALD_PORT", "80.5"),
    ("HERALD_MAX_UPLOAD_BYTES", "0"),
    ("HERALD_MAX_UPLOAD_BYTES", "-5"),
    ("HERALD_MAX_UPLOAD_BYTES", "25MB"),
    ("HERALD_SSE_HEARTBEAT_S", "fast"),
    ("HERALD_SSE_HEARTBEAT_S", "0"),
    ("HERALD_SSE_HEARTBEAT_S", "nan"),
    ("HERALD_SSE_HEARTBEAT_S", "inf"),
    ("HERALD_SSE_STALE_S", "-1"),
    ("HERALD_SSE_MAX_PER_IP", "-3"),
    ("HERALD_SSE_MAX_PER_IP", "0"),
    ("HERALD_SSE_MAX_CONNECTIONS", "lots"),
    ("HERALD_SHUTDOWN_TIMEOUT_S", "-0.1"),
    ("HERALD_SHUTDOWN_TIMEOUT_S", "20.5"),
    ("HERALD_TRUSTED_PROXIES", "10.0.0.0/33"),
    ("HERALD_TRUSTED_PROXIES", "10.0.0.1,proxy.local"),
    ("HERALD_QUEUE_MAX", "-10"),
    ("HERALD_QUEUE_MAX", "ten"),
    ("HERALD_QUEUE_ALERT", "-1"),
    ("HERALD_QUEUE_MAX_PER_USER", "0"),
    ("HERALD_CLEANUP_BATCH", "-1"),
    ("HERALD_QUEUE_RETENTION_S", "-1"),
    ("HERALD_SSE_BUFFER_BYTES", "12"),
    ("HERALD_CACHE_TTL_S", "-300"),
    ("HERALD_CACHE_TTL_S", "5m"),
    ("HERALD_SLOW_QUERY_MS", "-inf"),
    ("HERALD_ORPHAN_GRACE_S", "1h"),
    ("HERALD_CORS_ORIGINS", "app.example.com"),
    ("HERALD_CORS_ORIGINS", "https://app.example.com/path"),
    ("HERALD_CORS_ORIGINS", "https://app.example.com?x=1"),
    ("HERALD_CORS_ORIGINS", "https://app.example.com#frag"),
    ("HERALD_CORS_ORIGINS", "https://user@app.example.com"),
    ("HERALD_CORS_ORIGINS", "https://app.example.com:abc"),
    ("HERALD_CORS_ORIGINS", "ftp://app.example.com"),
    ("HERALD_CORS_ORIGINS", "null"),
    ("HERALD_CORS_ORIGINS", "*"),
    ("HERALD_UPLOAD_DIR", "/tmp/a\x00b"),
    ("HERALD_WEB_APP", "maybe"),
    ("HERALD_WEB_APP", "2"),
    ("HERALD_UVLOOP", "maybe"),
    ("HERALD_UVLOOP", "2"),
    ("HERALD_PROCESSES", "-1"),
    ("HERALD_PROCESSES", "many"),
    ("HERALD_PROCESSES", "257"),
]


def from_env(env: dict[str, str]) -> Settings:
    return Settings.from_env(env=env, dotenv=None)


def test_every_default() -> None:
    s = from_env({})
    for field, value in DEFAULTS.items():
        assert getattr(s, field) == value, field
    assert s.redis_db == 0


def test_blank_values_mean_default() -> None:
    env = {"HERALD_PORT": "", "HERALD_HOST": "  ", "CRON_SECRET": " ", "DATABASE_URL": ""}
    s = from_env(env)
    assert (s.port, s.host, s.cron_secret) == (8080, "127.0.0.1", None)
    assert s.database_url == DEFAULTS["database_url"]


@pytest.mark.parametrize(("var", "raw", "field", "expected"), GOOD)
def test_good_value(var: str, raw: str, field: str, expected: object) -> None:
    s = from_env({var: raw})
    assert getattr(s, field) == (raw if expected is None else expected)


def test_numbers_tolerate_surrounding_space() -> None:
    assert from_env({"HERALD_PORT": " 9090 "}).port == 9090


def test_trusted_proxies_and_cors_lists() -> None:
    s = from_env(
        {
            "HERALD_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7 ,::1,",
            "HERALD_CORS_ORIGINS": "https://App.Example.com/, http://localhost:3000",
        }
    )
    assert s.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert s.cors_origins == {"https://app.example.com", "http://localhost:3000"}


def test_queue_alert_equal_to_max_is_fine() -> None:
    s = from_env({"HERALD_QUEUE_MAX": "100", "HERALD_QUEUE_ALERT": "100"})
    assert (s.queue_max, s.queue_alert) == (100, 100)


def test_redis_db_from_url() -> None:
    assert from_env({"REDIS_URL": "redis://h:6379/9"}).redis_db == 9
    assert from_env({"REDIS_URL": "redis://h:6379"}).redis_db == 0
    # ?db= wins over the path, as in arq and redis-py (which do the connecting).
    assert from_env({"REDIS_URL": "redis://h:6379/2?db=5"}).redis_db == 5
    assert from_env({"REDIS_URL": "unix:///run/redis.sock?db=4"}).redis_db == 4
    assert from_env({"REDIS_URL": "unix:///run/redis.sock"}).redis_db == 0


def test_sentinels_take_db_and_credentials_from_redis_url() -> None:
    s = from_env({"REDIS_SENTINELS": "s1:26379", "REDIS_URL": "redis://herald:p%40ss@ignored:1/7"})
    assert s.redis_sentinels == (("s1", 26379),)
    assert (s.redis_db, s.redis_credentials) == (7, ("herald", "p@ss"))
    assert from_env({"REDIS_URL": "redis://:pw@h/0"}).redis_credentials == (None, "pw")
    assert from_env({}).redis_credentials == (None, None)


def test_settings_are_frozen() -> None:
    s = from_env({})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("var", "raw"), BAD)
def test_bad_value_names_the_variable_in_one_line(var: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        from_env({var: raw})
    message = str(info.value)
    assert message.startswith(f"{var}:"), message
    assert "\n" not in message
    assert "Traceback" not in message


def test_queue_alert_above_max() -> None:
    with pytest.raises(SettingsError) as info:
        from_env({"HERALD_QUEUE_MAX": "100", "HERALD_QUEUE_ALERT": "101"})
    assert str(info.value).startswith("HERALD_QUEUE_ALERT:")
    with pytest.raises(SettingsError, match=r"^HERALD_QUEUE_ALERT:"):
        from_env({"HERALD_QUEUE_MAX": "5000"})  # default alert 8000 > 5000


def test_shutdown_timeout_is_bounded_below_the_units_stop_timeout() -> None:
    # systemd/*.service have TimeoutStopSec=30: a longer drain would be killed midway.
    with pytest.raises(SettingsError) as info:
        from_env({"HERALD_SHUTDOWN_TIMEOUT_S": "45"})
    assert str(info.value) == "HERALD_SHUTDOWN_TIMEOUT_S: must be at most 20, got 45"


def test_newline_in_bad_value_stays_one_line() -> None:
    with pytest.raises(SettingsError) as info:
        from_env({"HERALD_PORT": "80\nHERALD_X=1"})
    assert "\n" not in str(info.value)


def test_dotenv_is_read(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# a comment\n"
        "\n"
        "HERALD_PORT=9001\n"
        "export HERALD_HOST = 0.0.0.0\n"
        "CRON_SECRET='quoted secret'\n"
        'HERALD_CORS_ORIGINS="https://a.example"\n'
        "HERALD_UPLOAD_DIR=/srv/up=loads\n",
        encoding="utf-8",
    )
    s = Settings.from_env(env={}, dotenv=dotenv)
    assert s.port == 9001
    assert s.host == "0.0.0.0"  # noqa: S104
    assert s.cron_secret == "quoted secret"
    assert s.cors_origins == {"https://a.example"}
    assert s.upload_dir == Path("/srv/up=loads")


def test_real_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HERALD_PORT=9001\nHERALD_SSE_MAX_PER_IP=9\n", encoding="utf-8")
    s = Settings.from_env(env={"HERALD_PORT": "9002"}, dotenv=dotenv)
    assert (s.port, s.sse_max_per_ip) == (9002, 9)


def test_os_environ_is_the_default_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HERALD_PORT=9001\n", encoding="utf-8")
    monkeypatch.setenv("HERALD_PORT", "9003")
    assert Settings.from_env(dotenv=dotenv).port == 9003
    monkeypatch.delenv("HERALD_PORT")
    assert Settings.from_env(dotenv=dotenv).port == 9001


def test_bad_value_in_dotenv_names_the_variable(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HERALD_PORT=abc\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"^HERALD_PORT:"):
        Settings.from_env(env={}, dotenv=dotenv)


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path / "absent.env") == {}
    assert Settings.from_env(env={}, dotenv=tmp_path / "absent.env").port == 8080


@pytest.mark.parametrize("line", ["JUST_A_WORD", "=value", "1BAD=x", "A B=c"])
def test_malformed_dotenv_line(tmp_path: Path, line: str) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"OK=1\n{line}\n", encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        read_dotenv(dotenv)
    assert ":2:" in str(info.value)
    assert "\n" not in str(info.value)


def test_undecodable_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_bytes(b"HERALD_PORT=\xff\xfe\n")
    with pytest.raises(SettingsError, match="cannot read"):
        read_dotenv(dotenv)
    (tmp_path / "dir.env").mkdir()
    with pytest.raises(SettingsError, match="cannot read"):
        read_dotenv(tmp_path / "dir.env")


def test_systemd_notify_variables() -> None:
    # Set by systemd for a Type=notify unit (shared/sdnotify.py), not by the operator.
    s = from_env({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"})
    assert (s.notify_socket, s.watchdog_usec) == ("/run/systemd/notify", 30_000_000)
    assert from_env({"NOTIFY_SOCKET": "@abstract"}).notify_socket == "@abstract"
    assert (from_env({}).notify_socket, from_env({}).watchdog_usec) == (None, None)


@pytest.mark.parametrize("raw", ["", "0", "-5", "1.5", "soon", "١٢"])
def test_watchdog_usec_that_is_not_a_positive_number_is_off(raw: str) -> None:
    # Never a configuration error: libsystemd's sd_watchdog_enabled ignores these too.
    assert from_env({"WATCHDOG_USEC": raw}).watchdog_usec is None


def test_watchdog_for_another_process_is_off() -> None:
    mine = from_env({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_usec == 1_000_000
    other = from_env({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_usec is None


def test_notify_variables_never_come_from_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("NOTIFY_SOCKET=/tmp/fake\nWATCHDOG_USEC=1000000\n", encoding="utf-8")
    s = Settings.from_env(env={}, dotenv=dotenv)
    assert (s.notify_socket, s.watchdog_usec) == (None, None)


def test_process_count_resolves_auto_to_the_cores_this_process_may_use() -> None:
    assert from_env({"HERALD_PROCESSES": "3"}).process_count == 3
    assert from_env({"HERALD_PROCESSES": "auto"}).process_count == len(os.sched_getaffinity(0))


def test_process_index_comes_from_the_real_environment_only(tmp_path: Path) -> None:
    """The supervisor sets it for its children; a .env file cannot claim to be one."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("HERALD_PROCESS_INDEX=1\n")
    assert Settings.from_env(env={}, dotenv=dotenv).process_index is None
    assert from_env({"HERALD_PROCESS_INDEX": "1"}).process_index == 1
