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

Environment: POINTSWITCH_CONFIG (file), POINTSWITCH_DSN, POINTSWITCH_DATA_DIR,
POINTSWITCH_LOG_LEVEL, POINTSWITCH_MASTER_KEY (hex), and POINTSWITCH_LIMITS_<NAME>,
POINTSWITCH_DATABASE_<NAME>, POINTSWITCH_SECURITY_<NAME> for any single setting of
those sections.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .codecs import DIALECTS
from .codecs.framing import FRAMINGS


class ConfigError(ValueError):
    pass


@dataclass
class ListenerConfig:
    name: str
    port: int
    dialect: str = "cup"
    framing: str = "binary2"
    host: str = "0.0.0.0"
    # MAC on financial messages: "ecb" (terminal MAK; the cup default), "x919" (with
    # mac_key_file, agreed at configuration time) or "off" (the iso87 default).
    mac: str = ""
    mac_key_file: str = ""
    require_sign_on: bool = True

    @property
    def mac_method(self) -> str:
        return self.mac or ("ecb" if self.dialect == "cup" else "off")

    def validate(self) -> None:
        if self.dialect not in DIALECTS:
            raise ConfigError(f"listener {self.name}: unknown dialect {self.dialect!r}")
        if self.framing not in FRAMINGS:
            raise ConfigError(f"listener {self.name}: unknown framing {self.framing!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"listener {self.name}: port {self.port} out of range")
        if self.mac_method not in ("ecb", "x919", "off"):
            raise ConfigError(f"listener {self.name}: mac is ecb, x919 or off")
        if self.mac_method == "x919" and not self.mac_key_file:
            raise ConfigError(f"listener {self.name}: mac = x919 needs mac_key_file")
        if self.mac_method == "ecb" and not self.require_sign_on:
            raise ConfigError(f"listener {self.name}: mac = ecb uses the terminal's MAK and needs sign-on")


@dataclass
class Limits:
    max_frame_bytes: int = 4096  # a frame's length header above this closes the connection
    max_connections: int = 1024  # across all listeners; more are accepted and closed at once
    max_in_flight_per_connection: int = 32  # reading pauses while this many are in progress
    idle_timeout_s: float = 300.0  # a connection silent this long is closed
    frame_timeout_s: float = 30.0  # a started frame must complete within this
    request_timeout_s: float = 10.0  # processing one request; past it the answer is 96
    shutdown_grace_s: float = 15.0  # on SIGTERM, time allowed for requests in flight
    max_undecodable_frames: int = 16  # consecutive frames that cannot be answered at all


@dataclass
class DatabaseConfig:
    dsn: str | None = None
    data_dir: str = ""  # embedded PostgreSQL's folder; default: platform data dir
    pool_min_size: int = 2
    pool_max_size: int = 10
    command_timeout_s: float = 10.0


@dataclass
class SecurityConfig:
    master_key_file: str = ""  # hex master key; or POINTSWITCH_MASTER_KEY; embedded default: generated
    max_pin_tries: int = 3  # wrong PINs in a row before the card is locked for PIN use


DEFAULT_LISTENERS = [
    ListenerConfig(name="cup", port=5000, dialect="cup", framing="binary2"),
    ListenerConfig(name="iso87", port=5001, dialect="iso87", framing="ascii4"),
]


@dataclass
class Config:
    listeners: list[ListenerConfig] = field(default_factory=lambda: [dataclasses.replace(x) for x in DEFAULT_LISTENERS])
    limits: Limits = field(default_factory=Limits)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log_level: str = "info"

    @property
    def data_dir(self) -> Path:
        if self.database.data_dir:
            return Path(self.database.data_dir).expanduser()
        import platformdirs

        return Path(platformdirs.user_data_dir("pointswitch"))


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
    unknown = set(raw) - {"listener", "limits", "database", "security", "log_level"}
    if unknown:
        raise ConfigError(f"unknown config sections: {', '.join(sorted(unknown))}")
    if "listener" in raw:
        config.listeners = []
        for item in raw["listener"]:
            try:
                config.listeners.append(ListenerConfig(**item))
            except TypeError as exc:
                raise ConfigError(f"[[listener]]: {exc}") from None
    _apply(config.limits, raw.get("limits", {}), "limits")
    _apply(config.database, raw.get("database", {}), "database")
    _apply(config.security, raw.get("security", {}), "security")
    if "log_level" in raw:
        config.log_level = str(raw["log_level"])
    # Environment overrides the file.
    prefix_sections = {"POINTSWITCH_LIMITS_": ("limits", config.limits),
                       "POINTSWITCH_DATABASE_": ("database", config.database),
                       "POINTSWITCH_SECURITY_": ("security", config.security)}
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
    names = [lst.name for lst in config.listeners]
    if len(set(names)) != len(names):
        raise ConfigError("listener names must be unique")
    for lst in config.listeners:
        lst.validate()
    return config
