"""Configuration: frozen dataclasses loaded from TOML, then environment, then command-line flags.

Precedence (highest first): flags, environment (CHATLEDGER_*), the config file, defaults.
Every error names the key it is about, so `chatledger` can exit with one clear line.

One module because it is one schema: each section's dataclass, its defaults and its validation sit next
to the one loader that applies the precedence, so a key is defined, checked and documented in one place.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///chatledger.db"


class ConfigError(ValueError):
    """A bad config file or value; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_size: int = 32 * 1024 * 1024
    shutdown_grace: float = 30.0
    copy_budget_mb: int = 256
    header_timeout: float = 20.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_connections: int = 10_000


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "https://openrouter.ai"
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_connections: int = 0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """`[[routes]]`: calls whose path starts with `prefix` go to `url`, the prefix removed. Timeouts left
    unset (None) are upstream.connect_timeout and upstream.read_timeout."""

    prefix: str
    url: str
    connect_timeout: float | None = None
    read_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str = DEFAULT_DATABASE_URL
    auto_migrate: bool = True
    spool_dir: str = ""
    queue_max: int = 100_000
    batch_max: int = 5_000
    write_timeout: float = 5.0
    flush_interval: float = 0.25
    writer: str = "process"
    writer_backlog_mb: int = 128


WRITER_MODES = ("process", "inline")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    all_paths: bool = False
    inject_stream_usage: bool = True
    level: str = "info"
    library_level: str = "warning"
    access_log: bool = False


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: str = ""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens; None means 'not priced separately'."""

    prompt: Decimal
    completion: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None


RETENTION_INTERVAL = 86_400.0


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """`[retention]`: with days > 0 the writer deletes calls older than that many days (whole UTC days),
    checking every `interval` seconds; 0 keeps every row."""

    days: int = 0
    interval: float = RETENTION_INTERVAL


PRICE_RELOAD_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class PricingConfig:
    models: dict[str, ModelPrice] = field(default_factory=dict)
    reload_interval: float = PRICE_RELOAD_INTERVAL  # how often a running proxy reloads the price table


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    routes: tuple[RouteConfig, ...] = ()

    def replace(self, section: str, **changes: Any) -> Config:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


_SECTIONS = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "database": DatabaseConfig,
    "logging": LoggingConfig,
    "admin": AdminConfig,
    "retention": RetentionConfig,
}
DURATIONS = {"retention.interval"}  # seconds, or a duration such as "1d", "6h", "30m"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

ENVIRONMENT = {
    "CHATLEDGER_DATABASE_URL": ("database", "url"),
    "CHATLEDGER_UPSTREAM_URL": ("upstream", "url"),
    "CHATLEDGER_PORT": ("server", "port"),
    "CHATLEDGER_HOST": ("server", "host"),
    "CHATLEDGER_ADMIN_TOKEN": ("admin", "token"),
}


def _coerce(key: str, kind: Any, value: Any) -> Any:
    """Convert a TOML/env/flag value to the field's type, or raise naming the key."""
    if kind in (bool, "bool"):
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind in (int, "int"):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if kind in (float, "float"):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _duration(key: str, value: str) -> Any:
    """"1d", "12h", "1h30m" as seconds; anything else is left for the number check to refuse."""
    text = value.strip()
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        return value
    return sum(float(amount) * _SECONDS[unit.lower()] for amount, unit in parts)


def _price(key: str, value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a price in USD per million tokens, got {value!r}")
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{key}: expected a price in USD per million tokens, got {value!r}") from None
    if not price.is_finite() or price < 0:
        raise ConfigError(f"{key}: expected a non-negative price, got {value!r}")
    return price


def _parse_pricing(table: Any) -> PricingConfig:
    if not isinstance(table, dict):
        raise ConfigError("pricing: expected a table")
    unknown = set(table) - {"models", "reload_interval"}
    if unknown:
        raise ConfigError(f"pricing.{sorted(unknown)[0]}: unknown key")
    reload_interval = table.get("reload_interval", PRICE_RELOAD_INTERVAL)
    if isinstance(reload_interval, bool) or not isinstance(reload_interval, int | float) or reload_interval <= 0:
        raise ConfigError(f"pricing.reload_interval: expected seconds > 0, got {reload_interval!r}")
    models_table = table.get("models", {})
    if not isinstance(models_table, dict):
        raise ConfigError("pricing.models: expected a table")
    models: dict[str, ModelPrice] = {}
    for pattern, entry in models_table.items():
        prefix = f'pricing.models."{pattern}"'
        if not isinstance(entry, dict):
            raise ConfigError(f"{prefix}: expected a table")
        allowed = {"prompt", "completion", "cache_read", "cache_write", "reasoning"}
        for name in entry:
            if name not in allowed:
                expected = ", ".join(sorted(allowed))
                raise ConfigError(f"{prefix}.{name}: unknown key (expected one of {expected})")
        for required in ("prompt", "completion"):
            if required not in entry:
                raise ConfigError(f"{prefix}.{required}: missing")
        models[pattern] = ModelPrice(
            **{name: _price(f"{prefix}.{name}", value) for name, value in entry.items()}
        )
    return PricingConfig(models=models, reload_interval=float(reload_interval))


_ROUTE_KEYS = {"prefix": str, "url": str, "connect_timeout": float, "read_timeout": float}


def _parse_routes(value: Any) -> tuple[RouteConfig, ...]:
    """`[[routes]]` tables, each checked for its keys and types (validate() checks the values)."""
    if not isinstance(value, list):
        raise ConfigError("routes: expected an array of tables ([[routes]])")
    routes = []
    for position, table in enumerate(value):
        name = f"routes[{position}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a table")
        for key in table:
            if key not in _ROUTE_KEYS:
                raise ConfigError(f"{name}.{key}: unknown key (expected one of {', '.join(_ROUTE_KEYS)})")
        for required in ("prefix", "url"):
            if required not in table:
                raise ConfigError(f"{name}.{required}: missing")
        routes.append(
            RouteConfig(**{key: _coerce(f"{name}.{key}", _ROUTE_KEYS[key], item) for key, item in table.items()})
        )
    return tuple(routes)


def _apply(config: Config, section: str, name: str, value: Any, origin: str) -> Config:
    cls = _SECTIONS[section]
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    key = f"{section}.{name}"
    if name not in fields:
        raise ConfigError(f"{key}: unknown key{origin}")
    if key in DURATIONS and isinstance(value, str):
        value = _duration(key + origin, value)
    return config.replace(section, **{name: _coerce(key + origin, fields[name], value)})


def load_file(path: str | os.PathLike[str], config: Config | None = None) -> Config:
    config = config or Config()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML ({exc})") from None
    for section, table in data.items():
        if section == "pricing":
            config = dataclasses.replace(config, pricing=_parse_pricing(table))
            continue
        if section == "routes":
            config = dataclasses.replace(config, routes=_parse_routes(table))
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"{section}: unknown section in {path}")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table in {path}")
        for name, value in table.items():
            config = _apply(config, section, name, value, "")
    return config


def load(
    config_path: str | None = None,
    overrides: dict[tuple[str, str], Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Build the effective config: defaults < file < environment < overrides (flags)."""
    environ = os.environ if environ is None else environ
    config = Config()
    path = config_path or environ.get("CHATLEDGER_CONFIG")
    if path:
        config = load_file(path, config)
    for variable, (section, name) in ENVIRONMENT.items():
        if environ.get(variable):
            config = _apply(config, section, name, environ[variable], f" (from {variable})")
    for (section, name), value in (overrides or {}).items():
        if value is not None:
            config = _apply(config, section, name, value, "")
    return validate(config)


def validate(config: Config) -> Config:
    """Check ranges and normalise URLs; returns the config with normalised values."""
    if not 0 <= config.server.port <= 65535:
        raise ConfigError(f"server.port: expected 0-65535, got {config.server.port}")
    if config.server.workers < 1:
        raise ConfigError(f"server.workers: expected at least 1, got {config.server.workers}")
    if not config.server.host.strip():
        raise ConfigError("server.host: empty")
    if config.server.max_body_size < 1:
        raise ConfigError("server.max_body_size: expected a positive number of bytes")
    if config.server.copy_budget_mb < 1:
        raise ConfigError(f"server.copy_budget_mb: expected at least 1, got {config.server.copy_budget_mb}")
    if config.server.shutdown_grace < 0:
        raise ConfigError(f"server.shutdown_grace: expected seconds >= 0, got {config.server.shutdown_grace}")
    if config.upstream.max_connections < 0:
        raise ConfigError(
            f"upstream.max_connections: expected 0 (no limit) or more, got {config.upstream.max_connections}"
        )
    levels = (("logging.level", config.logging.level), ("logging.library_level", config.logging.library_level))
    for key, level in levels:
        if level.lower() not in LOG_LEVELS:
            raise ConfigError(f"{key}: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if config.server.max_connections < 1:
        raise ConfigError(f"server.max_connections: expected at least 1, got {config.server.max_connections}")
    for key, value in (
        ("upstream.connect_timeout", config.upstream.connect_timeout),
        ("upstream.read_timeout", config.upstream.read_timeout),
        ("database.write_timeout", config.database.write_timeout),
        ("server.header_timeout", config.server.header_timeout),
        ("server.body_timeout", config.server.body_timeout),
        ("server.keepalive_timeout", config.server.keepalive_timeout),
    ):
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive number of seconds, got {value}")
    if config.database.writer not in WRITER_MODES:
        raise ConfigError(f"database.writer: expected process or inline, got {config.database.writer!r}")
    if not 0 <= config.database.flush_interval <= 1:
        raise ConfigError(
            f"database.flush_interval: expected 0 to 1 seconds, got {config.database.flush_interval}"
        )
    if config.database.writer_backlog_mb < 1:
        raise ConfigError("database.writer_backlog_mb: expected at least 1")
    if config.database.queue_max < 1:
        raise ConfigError("database.queue_max: expected at least 1")
    if config.database.batch_max < 1:
        raise ConfigError("database.batch_max: expected at least 1")
    if config.retention.days < 0:
        raise ConfigError(f"retention.days: expected 0 (keep every row) or more, got {config.retention.days}")
    if config.retention.interval < 1:
        raise ConfigError(
            f"retention.interval: expected at least 1 second, got {config.retention.interval:g}"
        )
    config = config.replace("upstream", url=_upstream_url("upstream.url", config.upstream.url))
    config = dataclasses.replace(config, routes=_validate_routes(config.routes))
    return config.replace("database", url=normalize_database_url(config.database.url))


def _upstream_url(key: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http(s) URL, got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}: must not have a query or fragment")
    return url.rstrip("/")


LEDGER_PATH = "/_ledger"
_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)+")  # unreserved characters: the raw and decoded path agree


def _overlap(a: str, b: str) -> bool:
    """Two prefixes overlap when one path could start with both (they match whole segments)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _validate_routes(routes: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
    """Normalised routes: prefix without a trailing `/`, url checked; overlaps are errors."""
    checked: list[RouteConfig] = []
    for position, route in enumerate(routes):
        name = f"routes[{position}]"
        prefix = route.prefix.rstrip("/") if route.prefix != "/" else route.prefix
        if not _PREFIX.fullmatch(prefix) or any(part in (".", "..") for part in prefix.split("/")):
            raise ConfigError(
                f"{name}.prefix: expected a path like /openai (letters, digits, . _ ~ -), got {route.prefix!r}"
            )
        if _overlap(prefix, LEDGER_PATH):
            raise ConfigError(f"{name}.prefix: {prefix!r} overlaps chatledger's own {LEDGER_PATH}/ endpoints")
        for other_position, other in enumerate(checked):
            if _overlap(prefix, other.prefix):
                raise ConfigError(
                    f"{name}.prefix: {prefix!r} overlaps routes[{other_position}].prefix {other.prefix!r}"
                )
        for key in ("connect_timeout", "read_timeout"):
            value = getattr(route, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}.{key}: expected a positive number of seconds, got {value}")
        url = _upstream_url(f"{name}.url", route.url)
        checked.append(dataclasses.replace(route, prefix=prefix, url=url))
    return tuple(checked)


def normalize_database_url(url: str) -> str:
    """Accept a bare file path or a driverless URL and return an async SQLAlchemy URL."""
    url = url.strip()
    if not url:
        raise ConfigError("database.url: empty")
    if "://" not in url:
        return f"sqlite+aiosqlite:///{url}"
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+asyncpg://{rest}"
    if scheme in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        return url
    raise ConfigError(
        f"database.url: unsupported scheme {scheme!r} (use sqlite+aiosqlite:///path or postgresql+asyncpg://...)"
    )


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def check_database_url(url: str) -> None:
    """Raise ConfigError for a database URL that can never work (a SQLite file whose directory is missing
    or not writable, or that names a directory); a database that is only down is not checked here."""
    path = sqlite_path(url)
    if path is None:
        return
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"database.url: {path} is a directory, not a SQLite file")
    if not directory.is_dir():
        raise ConfigError(f"database.url: the directory {directory} of the SQLite file does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"database.url: the directory {directory} of the SQLite file is not writable")


def default_spool_dir(config: DatabaseConfig) -> Path:
    """Next to the SQLite file, or ./chatledger-spool for server databases."""
    if config.spool_dir:
        return Path(config.spool_dir)
    db_file = sqlite_path(config.url)
    if db_file is not None:
        return db_file.with_name(db_file.name + ".spool")
    return Path("chatledger-spool")


def redact_url(url: str) -> str:
    """The database URL without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
