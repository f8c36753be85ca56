"""Settings: a TOML file, then environment variables, then command-line flags.

Every limit is a named setting with a default (see docs/operator.md)::

    [[listener]]
    name = "cup"
    port = 5000
    dialect = "cup"        # or "iso87"
    framing = "binary2"    # or "ascii4"

    [database]
    dsn = "postgresql://..."   # absent: embedded PostgreSQL in data_dir

    [limits]
    max_connections = 1024

    [[connector]]              # upstream hosts: "bank" carries cash-out, "insurer" premiums
    name = "bank"
    host = "10.0.0.5"
    port = 6000

    [cash_out]
    points_per_yuan = "100"

    [day]                      # the business day (docs/operator.md, "The day's timeline")
    cutoff = "23:00"
    time_zone = "Asia/Shanghai"
    [expiry]
    policy = "months"          # never (default) | months | end_of_year
    months = 24
    [messages]                 # messages to members and merchants (docs/messages.md)
    sms_url = "https://sms.example/send"

Environment: POINTSWITCH_CONFIG (file), POINTSWITCH_DSN, POINTSWITCH_DATA_DIR,
POINTSWITCH_LOG_LEVEL, POINTSWITCH_MASTER_KEY (hex), and POINTSWITCH_LIMITS_<NAME>,
POINTSWITCH_DATABASE_<NAME>, POINTSWITCH_SECURITY_<NAME>, POINTSWITCH_DAY_<NAME>, POINTSWITCH_MESSAGES_<NAME>
for any single setting of those sections.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from .sections import (
    DEFAULT_LISTENERS,
    ApiConfig,
    ConfigError,
    ConnectorConfig,
    ConsoleConfig,
    DatabaseConfig,
    DayConfig,
    ExpiryConfig,
    HttpConfig,
    Limits,
    ListenerConfig,
    MessagesConfig,
    MetricsConfig,
    SecurityConfig,
    UsageConfig,
)

WORKER_ENV = "POINTSWITCH_WORKER"  # set by ``serve --workers`` in each worker process: its number

__all__ = [
    "ApiConfig", "Config", "load", "ConfigError", "ConnectorConfig", "ConsoleConfig", "DEFAULT_LISTENERS",
    "DatabaseConfig", "DayConfig", "ExpiryConfig", "HttpConfig", "Limits", "ListenerConfig", "MessagesConfig",
    "MetricsConfig", "SecurityConfig", "UsageConfig", "WORKER_ENV",
]


@dataclass
class Config:
    listeners: list[ListenerConfig] = field(default_factory=lambda: [dataclasses.replace(x) for x in DEFAULT_LISTENERS])
    limits: Limits = field(default_factory=Limits)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    connectors: list[ConnectorConfig] = field(default_factory=list)
    cash_out: UsageConfig = field(default_factory=lambda: UsageConfig(connector="bank"))
    insurance: UsageConfig = field(default_factory=lambda: UsageConfig(connector="insurer", daily_limit_fen=1_000_000))
    day: DayConfig = field(default_factory=DayConfig)
    expiry: ExpiryConfig = field(default_factory=ExpiryConfig)
    messages: MessagesConfig = field(default_factory=MessagesConfig)
    log_level: str = "info"
    workers: int = 1  # serve processes sharing the listeners' ports (SO_REUSEPORT); ``serve --workers``

    @property
    def data_dir(self) -> Path:
        if self.database.data_dir:
            return Path(self.database.data_dir).expanduser()
        import platformdirs

        return Path(platformdirs.user_data_dir("pointswitch"))

    @property
    def clearing_dir(self) -> Path:
        return Path(self.day.clearing_dir).expanduser() if self.day.clearing_dir else self.data_dir / "clearing"


def _coerce(kind: Any, value: Any, what: str) -> Any:
    if str(kind) == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{what}: {value!r} is not true or false")
    target = {"int": int, "float": float, "str": str, "str | None": str}.get(str(kind), None)
    if target is None:
        return value
    try:
        return target(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not a {target.__name__}") from None


def _apply(obj: Any, values: dict[str, Any], section: str) -> None:
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"[{section}] has no setting {key!r}; known: {', '.join(known)}")
        setattr(obj, key, _coerce(known[key].type, value, f"{section}.{key}"))


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    path = path or env.get("POINTSWITCH_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    config = Config()
    unknown = set(raw) - {"listener", "connector", "limits", "database", "security", "cash_out", "insurance",
                          "metrics", "http", "api", "console", "day", "expiry", "messages", "log_level",
                          "workers"}
    if unknown:
        raise ConfigError(f"unknown config sections: {', '.join(sorted(unknown))}")
    if "listener" in raw:
        config.listeners = []
        for item in raw["listener"]:
            if "name" not in item or "port" not in item:
                raise ConfigError("[[listener]]: every listener has a name and a port")
            listener = ListenerConfig(name=str(item["name"]), port=0)
            for gone in ("mac_key_file", "require_sign_on"):
                if gone in item:
                    raise ConfigError(f"listener {item['name']}: {gone} is no longer a setting: every terminal"
                                      " authenticates with the MAK of its own sign-on (see docs/security.md)")
            _apply(listener, {k: v for k, v in item.items() if k != "name"}, f"listener {item['name']}")
            config.listeners.append(listener)
    for item in raw.get("connector", []):
        if "name" not in item:
            raise ConfigError("[[connector]]: every connector has a name")
        connector = ConnectorConfig(name=str(item["name"]))
        _apply(connector, {k: v for k, v in item.items() if k != "name"}, f"connector {item['name']}")
        config.connectors.append(connector)
    _apply(config.limits, raw.get("limits", {}), "limits")
    _apply(config.cash_out, raw.get("cash_out", {}), "cash_out")
    _apply(config.insurance, raw.get("insurance", {}), "insurance")
    _apply(config.database, raw.get("database", {}), "database")
    _apply(config.security, raw.get("security", {}), "security")
    _apply(config.metrics, raw.get("metrics", {}), "metrics")
    _apply(config.http, raw.get("http", {}), "http")
    _apply(config.api, raw.get("api", {}), "api")
    _apply(config.console, raw.get("console", {}), "console")
    _apply(config.day, raw.get("day", {}), "day")
    _apply(config.expiry, raw.get("expiry", {}), "expiry")
    config.expiry.validate()
    _apply(config.messages, raw.get("messages", {}), "messages")
    if "log_level" in raw:
        config.log_level = str(raw["log_level"])
    if "workers" in raw:
        config.workers = _coerce("int", raw["workers"], "workers")
    # Environment overrides the file.
    prefix_sections = {"POINTSWITCH_LIMITS_": ("limits", config.limits),
                       "POINTSWITCH_DATABASE_": ("database", config.database),
                       "POINTSWITCH_SECURITY_": ("security", config.security),
                       "POINTSWITCH_DAY_": ("day", config.day),
                       "POINTSWITCH_HTTP_": ("http", config.http),
                       "POINTSWITCH_MESSAGES_": ("messages", config.messages)}
    for name, value in env.items():
        for prefix, (section, obj) in prefix_sections.items():
            if name.startswith(prefix):
                _apply(obj, {name[len(prefix):].lower(): value}, section)
    if env.get("POINTSWITCH_DSN"):
        config.database.dsn = env["POINTSWITCH_DSN"]
    if env.get("POINTSWITCH_DATA_DIR"):
        config.database.data_dir = env["POINTSWITCH_DATA_DIR"]
    if env.get("POINTSWITCH_LOG_LEVEL"):
        config.log_level = env["POINTSWITCH_LOG_LEVEL"]
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level is debug, info, warning or error, not {config.log_level!r}")
    names = [lst.name for lst in config.listeners]
    if len(set(names)) != len(names):
        raise ConfigError("listener names must be unique")
    for lst in config.listeners:
        lst.validate()
    connector_names = [c.name for c in config.connectors]
    if len(set(connector_names)) != len(connector_names):
        raise ConfigError("connector names must be unique")
    for conn in config.connectors:
        conn.validate()
        if conn.response_timeout_s + 1 >= config.limits.request_timeout_s:
            raise ConfigError(f"connector {conn.name}: response_timeout_s must be at least 1 s below"
                              f" [limits] request_timeout_s ({config.limits.request_timeout_s})")
    for section, usage in (("cash_out", config.cash_out), ("insurance", config.insurance)):
        try:
            rate = Decimal(usage.points_per_yuan)
        except ArithmeticError:
            raise ConfigError(f"[{section}] points_per_yuan: {usage.points_per_yuan!r} is not a number") from None
        if rate <= 0 or usage.fee_points < 0 or usage.min_amount_fen < 1 or usage.daily_limit_fen < 0:
            raise ConfigError(f"[{section}]: points_per_yuan > 0, fee_points >= 0, min_amount_fen >= 1")
    config.day.validate()
    config.api.validate()
    config.messages.validate()
    if not 1 <= config.workers <= 64:
        raise ConfigError(f"workers is 1 to 64, not {config.workers}")
    db = config.database
    if db.group_commit_writers < 0 or db.group_commit_max_batch < 1:
        raise ConfigError("[database] group_commit_writers >= 0 and group_commit_max_batch >= 1")
    if db.group_commit_writers >= db.pool_max_size:
        raise ConfigError(f"[database] group_commit_writers ({db.group_commit_writers}) each hold a connection:"
                          f" pool_max_size ({db.pool_max_size}) must be larger")
    return config
