"""Herald's settings: read from the environment (and an optional ``.env``) in one place."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit


class SettingsError(Exception):
    """A setting has a bad value; the message names the variable in one line."""


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a minimal ``KEY=VALUE`` file (comments, blank lines, optional quotes)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read .env file ({exc.__class__.__name__})") from exc
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SettingsError(f"{path}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}, got {value}")
    return value


def _float(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float = 0.0,
    maximum: float | None = None,
) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(f"{name}: expected a finite number, got {raw!r}")
    if value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}: must be at most {maximum:g}, got {value:g}")
    return value


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    raw = (env.get(name) or default).strip()
    try:
        parts = urlsplit(raw)
        if parts.scheme.startswith("postgres"):
            _check_pg_hosts(parts.netloc)
        else:
            parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SettingsError(f"{name}: not a valid URL") from None
    if parts.scheme not in schemes:
        raise SettingsError(f"{name}: scheme must be one of {', '.join(schemes)}")
    # libpq reads postgresql:///db as "the local Unix socket", so a database name (or a
    # host= parameter) is enough there; Redis URLs need a host.
    has_target = bool(parts.hostname) or "host=" in parts.query
    if parts.scheme.startswith("postgres"):
        has_target = has_target or parts.path.strip("/") != ""
    if not has_target and parts.scheme != "unix":
        raise SettingsError(f"{name}: URL has no host")
    if parts.scheme in ("redis", "rediss", "unix") and _redis_db(parts) is None:
        # arq and redis-py would fail later with a bare ValueError naming nothing.
        raise SettingsError(f"{name}: the database number must be a whole number, e.g. /0")
    return raw


def _check_pg_hosts(netloc: str) -> None:
    """libpq's URLs may name several servers, ``host1:port1,host2:port2`` (it tries
    them in turn; ``target_session_attrs`` picks the writable one), which ``urlsplit``
    cannot take apart: each entry's port is checked here. ValueError if one is bad."""
    hosts = netloc.rpartition("@")[2]
    if "," not in hosts:
        urlsplit(f"//{hosts}").port  # noqa: B018 - raises ValueError on a bad port
        return
    for entry in hosts.split(","):
        if not entry or "/" in entry:
            raise ValueError(entry)
        urlsplit(f"//{entry}").port  # noqa: B018 - raises ValueError on a bad port


REDIS_DB_PATH = re.compile(r"(?:/[0-9]{1,9})?")


def _redis_db(parts: SplitResult) -> int | None:
    """The database a Redis URL selects (``?db=`` wins over the path, as in arq and
    redis-py; a ``unix://`` path is the socket); None when it is not a whole number."""
    from_query = parse_qs(parts.query).get("db")
    if from_query:
        text = from_query[0]
        return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None
    path = "" if parts.scheme == "unix" else parts.path
    if not REDIS_DB_PATH.fullmatch(path):
        return None
    return int(path[1:]) if path else 0


def _notify_socket(env: Mapping[str, str]) -> str | None:
    return env.get("NOTIFY_SOCKET") or None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """systemd's watchdog interval, as libsystemd's ``sd_watchdog_enabled`` reads it:
    unset, not a positive number, or meant for another process (``WATCHDOG_PID``) → off."""
    raw, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not (raw.isascii() and raw.isdigit()) or int(raw) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(raw)


HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _host(env: Mapping[str, str], name: str, default: str) -> str:
    """An IP address or a DNS host name (whether it resolves is seen at bind time)."""
    raw = env.get(name, "").strip() or default
    try:
        ipaddress.ip_address(raw)
        return raw
    except ValueError:
        pass
    if len(raw) <= 253 and HOSTNAME_RE.fullmatch(raw):
        return raw
    raise SettingsError(f"{name}: {raw!r} is not an IP address or host name")


SENTINEL_DEFAULT_PORT = 26379
SENTINEL_ENTRY = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:]*))(?::(?P<port>[^:]*))?")


def _sentinels(env: Mapping[str, str], name: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (IPv6 in brackets, port default 26379); empty: none."""
    found: list[tuple[str, int]] = []
    for item in env.get(name, "").split(","):
        item = item.strip()
        if not item:
            continue
        bad = SettingsError(f"{name}: {item!r} is not host:port (e.g. 10.0.0.5:26379)")
        match = SENTINEL_ENTRY.fullmatch(item)
        if match is None:
            raise bad
        host, port_text = match["v6"] or match["host"], match["port"]
        try:
            if match["v6"] is not None:
                ipaddress.IPv6Address(host)
            elif not HOSTNAME_RE.fullmatch(host) or len(host) > 253:
                ipaddress.ip_address(host)
        except ValueError:
            raise bad from None
        if port_text is None:
            port = SENTINEL_DEFAULT_PORT
        elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536:
            port = int(port_text)
        else:
            raise bad
        if (host, port) not in found:
            found.append((host, port))
    return tuple(found)


SENTINEL_MASTER_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _sentinel_master(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if not SENTINEL_MASTER_RE.fullmatch(raw):
        raise SettingsError(f"{name}: {raw!r} is not a master name (letters, digits, . _ -)")
    return raw


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default, minimum=0)
    if value > 65535:
        raise SettingsError(f"{name}: must be a port number 0-65535, got {value}")
    return value


def _networks(
    env: Mapping[str, str], name: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    raw = env.get(name, "")
    nets = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SettingsError(f"{name}: {item!r} is not an IP network (CIDR)") from None
    return tuple(nets)


def _origins(env: Mapping[str, str], name: str) -> frozenset[str]:
    origins = set()
    for item in env.get(name, "").split(","):
        item = item.strip().rstrip("/")
        if not item:
            continue
        bad = SettingsError(f"{name}: {item!r} is not an origin like https://app.example.com")
        try:
            parts = urlsplit(item)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise bad from None
        # An origin is scheme://host[:port] and nothing else: browsers never send a path,
        # query, fragment or user, so such an entry could never match.
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
            or item.endswith(("?", "#"))
        ):
            raise bad
        origins.add(item.lower())
    return frozenset(origins)


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise SettingsError(f"{name}: expected 1/0 (or true/false, yes/no, on/off), got {raw!r}")


def _processes(env: Mapping[str, str]) -> int:
    """HERALD_PROCESSES: server processes; ``auto`` or 0 is one per CPU core."""
    raw = env.get("HERALD_PROCESSES", "").strip().lower()
    if raw == "auto":
        return 0
    value = _int(env, "HERALD_PROCESSES", 1, minimum=0)
    if value > MAX_PROCESSES:
        raise SettingsError(f"HERALD_PROCESSES: at most {MAX_PROCESSES}, got {value}")
    return value


def _process_index(env: Mapping[str, str]) -> int | None:
    raw = env.get("HERALD_PROCESS_INDEX", "").strip()
    return _int(env, "HERALD_PROCESS_INDEX", 0) if raw else None


MAX_PROCESSES = 256
# What the service manager gave the supervisor is not for its children.
SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "HERALD_PROCESSES")


def supervised_child_env(
    *, index: int, port: int, notify_socket: str, watchdog_usec: int | None
) -> dict[str, str]:
    """The environment of server process ``index`` under `herald serve --processes`
    (server/supervisor.py): this one's, pinned to one process on the supervisor's port,
    reporting to the supervisor instead of systemd."""
    env = {k: v for k, v in os.environ.items() if k not in SUPERVISOR_ONLY}
    env.update(
        HERALD_PROCESSES="1",
        HERALD_PROCESS_INDEX=str(index),
        HERALD_PORT=str(port),
        NOTIFY_SOCKET=notify_socket,
    )
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Protective rules that HERALD_OBSERVE_ONLY can turn into "count and log, do not refuse".
OBSERVABLE_RULES = ("sse_limits", "queue_caps", "orphan_deletion")


def _rules(env: Mapping[str, str], name: str) -> frozenset[str]:
    names = {part.strip().lower() for part in env.get(name, "").split(",") if part.strip()}
    unknown = sorted(names - set(OBSERVABLE_RULES))
    if unknown:
        raise SettingsError(
            f"{name}: unknown rule {unknown[0]!r}; known: {', '.join(OBSERVABLE_RULES)}"
        )
    return frozenset(names)


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise SettingsError(f"{name}: must be one of {', '.join(choices)}, got {raw!r}")
    return raw


# The server's drain must end well before the systemd units' TimeoutStopSec=30 kills
# it mid-drain: 20 s leaves room for the REST grace, closing the pools and a slow host.
MAX_SHUTDOWN_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "postgresql://localhost/herald"
    redis_url: str = "redis://localhost:6379/0"
    # Set: every Redis client follows the master these Sentinels name (shared/bus.py),
    # and REDIS_URL gives only the database number and the credentials.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "herald"
    host: str = "127.0.0.1"
    port: int = 8080
    upload_dir: Path = Path("./var/uploads")
    max_upload_bytes: int = 26_214_400
    cron_secret: str | None = None
    sse_heartbeat_s: float = 15.0
    sse_stale_s: float = 30.0
    sse_max_per_ip: int = 5
    sse_max_connections: int = 1000
    shutdown_timeout_s: float = 5.0
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    queue_max: int = 10_000
    queue_alert: int = 8_000
    queue_max_per_user: int = 500
    cleanup_batch: int = 1000
    queue_retention_s: int = 86_400
    sse_buffer_bytes: int = 1_048_576
    cache_ttl_s: int = 300
    slow_query_ms: float = 100.0
    orphan_grace_s: int = 3600
    cors_origins: frozenset[str] = field(default_factory=frozenset)
    delivery_max_lateness_s: int = 300
    sse_max_channels: int = 100
    sse_catchup_s: float = 5.0
    backend_timeout_s: float = 5.0
    log_format: str = "text"
    log_level: str = "info"
    worker_metrics_port: int = 9091
    header_timeout_s: float = 10.0
    auth_fail_limit: int = 20
    observe_only: frozenset[str] = field(default_factory=frozenset)
    web_app: bool = False
    uvloop: bool = False
    # Server processes `herald serve` runs (0: one per CPU core); see server/supervisor.py.
    processes: int = 1
    # Set by the supervisor in each server process it starts (0, 1, ...), not
    # configuration: that process binds with SO_REUSEPORT beside its siblings.
    process_index: int | None = None
    # systemd's notify protocol (see shared/sdnotify.py): set by the service manager for
    # a Type=notify unit, not configuration. None = not under systemd, nothing is sent.
    notify_socket: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")
    ) -> Settings:
        """Build settings from ``env`` (default ``os.environ``) over an optional ``.env``."""
        merged: dict[str, str] = {}
        if dotenv is not None:
            merged.update(read_dotenv(dotenv))
        merged.update(os.environ if env is None else env)
        e = merged
        # NOTIFY_SOCKET/WATCHDOG_*: only from the real environment; a .env file cannot
        # speak for the service manager. They are read here rather than in sdnotify so
        # the environment keeps one reader and tests pass them in like any setting.
        process_env = os.environ if env is None else env
        queue_max = _int(e, "HERALD_QUEUE_MAX", 10_000, minimum=1)
        queue_alert = _int(e, "HERALD_QUEUE_ALERT", 8_000, minimum=1)
        if queue_alert > queue_max:
            raise SettingsError(
                f"HERALD_QUEUE_ALERT: {queue_alert} is above HERALD_QUEUE_MAX ({queue_max})"
            )
        upload_raw = e.get("HERALD_UPLOAD_DIR", "").strip() or "./var/uploads"
        if "\x00" in upload_raw:
            raise SettingsError("HERALD_UPLOAD_DIR: contains a NUL byte")
        cron = e.get("CRON_SECRET", "").strip() or None
        host = _host(e, "HERALD_HOST", "127.0.0.1")
        return cls(
            database_url=_url(
                e, "DATABASE_URL", "postgresql://localhost/herald", ("postgresql", "postgres")
            ),
            redis_url=_url(e, "REDIS_URL", "redis://localhost:6379/0", ("redis", "rediss", "unix")),
            redis_sentinels=_sentinels(e, "REDIS_SENTINELS"),
            redis_sentinel_master=_sentinel_master(e, "REDIS_SENTINEL_MASTER", "herald"),
            host=host,
            port=_port(e, "HERALD_PORT", 8080),
            upload_dir=Path(upload_raw),
            max_upload_bytes=_int(e, "HERALD_MAX_UPLOAD_BYTES", 26_214_400, minimum=1),
            cron_secret=cron,
            sse_heartbeat_s=_float(e, "HERALD_SSE_HEARTBEAT_S", 15.0, minimum=0.01),
            sse_stale_s=_float(e, "HERALD_SSE_STALE_S", 30.0, minimum=0.01),
            sse_max_per_ip=_int(e, "HERALD_SSE_MAX_PER_IP", 5, minimum=1),
            sse_max_connections=_int(e, "HERALD_SSE_MAX_CONNECTIONS", 1000, minimum=1),
            shutdown_timeout_s=_float(
                e, "HERALD_SHUTDOWN_TIMEOUT_S", 5.0, maximum=MAX_SHUTDOWN_TIMEOUT_S
            ),
            trusted_proxies=_networks(e, "HERALD_TRUSTED_PROXIES"),
            queue_max=queue_max,
            queue_alert=queue_alert,
            queue_max_per_user=_int(e, "HERALD_QUEUE_MAX_PER_USER", 500, minimum=1),
            cleanup_batch=_int(e, "HERALD_CLEANUP_BATCH", 1000, minimum=1),
            queue_retention_s=_int(e, "HERALD_QUEUE_RETENTION_S", 86_400),
            sse_buffer_bytes=_int(e, "HERALD_SSE_BUFFER_BYTES", 1_048_576, minimum=1024),
            cache_ttl_s=_int(e, "HERALD_CACHE_TTL_S", 300),
            slow_query_ms=_float(e, "HERALD_SLOW_QUERY_MS", 100.0),
            orphan_grace_s=_int(e, "HERALD_ORPHAN_GRACE_S", 3600),
            cors_origins=_origins(e, "HERALD_CORS_ORIGINS"),
            delivery_max_lateness_s=_int(e, "HERALD_DELIVERY_MAX_LATENESS_S", 300, minimum=1),
            sse_max_channels=_int(e, "HERALD_SSE_MAX_CHANNELS", 100, minimum=1),
            sse_catchup_s=_float(e, "HERALD_SSE_CATCHUP_S", 5.0, minimum=0.1),
            backend_timeout_s=_float(e, "HERALD_BACKEND_TIMEOUT_S", 5.0, minimum=0.1),
            log_format=_choice(e, "HERALD_LOG_FORMAT", "text", LOG_FORMATS),
            log_level=_choice(e, "HERALD_LOG_LEVEL", "info", LOG_LEVELS),
            worker_metrics_port=_port(e, "HERALD_WORKER_METRICS_PORT", 9091),
            header_timeout_s=_float(e, "HERALD_HEADER_TIMEOUT_S", 10.0, minimum=0.05),
            auth_fail_limit=_int(e, "HERALD_AUTH_FAIL_LIMIT", 20, minimum=1),
            observe_only=_rules(e, "HERALD_OBSERVE_ONLY"),
            web_app=_bool(e, "HERALD_WEB_APP", False),
            uvloop=_bool(e, "HERALD_UVLOOP", False),
            processes=_processes(e),
            process_index=_process_index(process_env),
            notify_socket=_notify_socket(process_env),
            watchdog_usec=_watchdog_usec(process_env),
        )

    @property
    def process_count(self) -> int:
        """``processes`` with 0 (auto) resolved to the CPU cores this process may use."""
        return self.processes or len(os.sched_getaffinity(0)) or 1

    @property
    def redis_db(self) -> int:
        """The Redis database number in ``REDIS_URL`` (pub/sub names include it)."""
        parts = urlsplit(self.redis_url)
        return _redis_db(parts) or 0

    @property
    def redis_credentials(self) -> tuple[str | None, str | None]:
        """``REDIS_URL``'s user name and password (percent-decoded), each None if absent."""
        parts = urlsplit(self.redis_url)
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        return user, password
