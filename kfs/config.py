"""Typed configuration, loaded and validated once at mount.

One YAML file per area in the repo's ``config/`` (the shipped defaults);
``--config DIR`` (or ``KFS_CONFIG``) overrides them file by file, key by key.
Every key is declared below as a dataclass field: unknown keys, wrong types
and bad values raise `ConfigError` with one line naming file, key and reason.

Field types understood by the loader: bool, int, float, str, `Duration`
(``30s``, ``15m``, ``2h``, ``30d`` or a number of seconds), `Size`
(a number of MB where the key ends in ``_mb``), ``X | None``, ``list[str]``,
``dict[str, X]`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class ConfigError(Exception):
    """A bad configuration; ``str()`` is the one line shown to the user."""


class Duration(float):
    """Seconds, written ``30s``, ``15m``, ``2h``, ``30d`` (or a bare number of seconds)."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> Duration:
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 15m, 2h or 30d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return Duration(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return Duration(float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"expected a duration like 30s, 15m, 2h or 30d, got {value!r}")


# --------------------------------------------------------------------------- areas
@dataclass
class VaultConfig:
    enabled: bool = True
    mount_path: str = "/data/vault"
    encryption: Literal["aes-256-gcm"] = "aes-256-gcm"
    kdf: Literal["pbkdf2-hmac-sha256", "pbkdf2"] = "pbkdf2-hmac-sha256"
    kdf_iterations: int = 100_000
    auto_lock_timeout: Duration = Duration(900)
    chunk_size: int = 16384

    def __post_init__(self) -> None:
        # the content format accepts 512 B .. 1 MiB chunks (kfs/vault/contentenc.py)
        if not 512 <= self.chunk_size <= 1 << 20:
            raise ConfigError(f"vault_config.yaml: chunk_size: must be between 512 and 1048576, got {self.chunk_size}")
        if self.kdf_iterations < 1000:
            raise ConfigError(f"vault_config.yaml: kdf_iterations: must be at least 1000, got {self.kdf_iterations}")


@dataclass
class LogstashConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    reconnect_max: Duration = Duration(30)
    spool_max_mb: int = 1024
    #: lines sent less than this long before a connection drops are sent again (at least once)
    replay_window: Duration = Duration(2)


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    output: str = "/data/logs/kai.log.jsonl"
    max_days: int = 30
    rotate_size_mb: float = 100
    retention_check_interval: Duration = Duration(3600)
    logstash: LogstashConfig | None = None


@dataclass
class MemorySyncConfig:
    collection: str = "agent_memory"
    topic: str = "log_line"
    match: dict[str, str] = field(default_factory=dict)
    text_field: str = "message"


@dataclass
class VectorConfig:
    provider: Literal["chroma", "qdrant", "milvus"] = "chroma"
    #: local: qdrant only, qdrant-client's in-process mode (the server's client API, pure Python)
    mode: Literal["embedded", "server", "local"] = "embedded"
    host: str = "127.0.0.1"
    port: int = 8000
    https: bool = False                 # qdrant server: TLS
    #: embedded chroma in a child process (it holds the GIL for a whole upsert: kfs/vectors/backends/isolated.py)
    backend_process: bool = True
    api_key: str | None = None          # qdrant server: a secret reference (vault:, env:, file:)
    sync_interval: Duration = Duration(30)
    sync_mode: Literal["batched", "streaming"] = "batched"
    batch_size: int = 256
    dimension: int | None = None
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_endpoint: str | None = None
    #: vault:PATH[#FIELD], env:NAME or file:PATH[#FIELD] (kfs/vectors/secrets.py)
    embedding_api_key: str | None = None
    embedding_api_key_secret: str | None = None  # older form: a plain file (= file:PATH#api_key)
    search_k: int = 10
    distance: Literal["cosine", "l2", "ip"] = "cosine"
    memory_sync: list[MemorySyncConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key, low, high in (("batch_size", 1, 100_000), ("search_k", 1, 1000), ("port", 1, 65535)):
            value = getattr(self, key)
            if not low <= value <= high:
                raise ConfigError(f"vector_config.yaml: {key}: must be between {low} and {high}, got {value}")
        if self.dimension is not None and not 1 <= self.dimension <= 65536:
            raise ConfigError(f"vector_config.yaml: dimension: must be between 1 and 65536, got {self.dimension}")
        if self.embedding_endpoint and self.dimension is None:
            # the collection's dimension is fixed before a text record is embedded (at sync time)
            raise ConfigError("vector_config.yaml: dimension: embedding_endpoint needs the model's dimension "
                              "(e.g. 1536 for text-embedding-ada-002)")
        if self.mode == "local" and self.provider != "qdrant":
            raise ConfigError(f"vector_config.yaml: mode: local is qdrant-client's mode (provider: qdrant), "
                              f"not {self.provider}'s")
        for key in ("api_key", "embedding_api_key"):
            ref = getattr(self, key)
            if ref is not None and not re.match(r"^(vault|env|file):.", ref):
                raise ConfigError(f"vector_config.yaml: {key}: must be vault:PATH[#FIELD], env:NAME or "
                                  f"file:PATH[#FIELD], got {ref!r}")


@dataclass
class SnapshotsConfig:
    # no zstd: Debian's unzip 6.0 cannot read zip method 93, and snapshots must stay unzip-readable
    compression: Literal["auto", "stored", "deflate"] = "auto"
    interval: Duration | None = None
    on_events: list[str] = field(default_factory=list)
    event_debounce: Duration = Duration(60)
    keep_last: int = 10
    keep_daily: int = 7
    keep_weekly: int = 4
    memory_window: int = 50


@dataclass
class WebSocketConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    max_message_kb: int = 256
    max_connections: int = 256
    send_queue: int = 1024


@dataclass
class NatsConfig:
    url: str | None = None
    token: str | None = None
    subject_prefix: str = "kfs.streams"
    jetstream: bool = False
    jetstream_max_age: Duration = Duration(7 * 86400)
    #: how long an event from another node waits for its predecessor before kfs gives up on the hole
    hold_timeout: Duration = Duration(45)


@dataclass
class RoleConfig:
    subscribe: list[str] = field(default_factory=list)
    publish: list[str] = field(default_factory=list)


@dataclass
class StreamsConfig:
    max_events: int = 100_000
    max_mb: float = 64
    metrics_interval: Duration = Duration(10)
    read_wait: Duration = Duration(0.25)
    reader_max_lag: int = 10_000
    streams: list[str] = field(default_factory=list)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    roles: dict[str, RoleConfig] = field(default_factory=dict)


@dataclass
class Config:
    vault: VaultConfig = field(default_factory=VaultConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    vectors: VectorConfig = field(default_factory=VectorConfig)
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)


#: file name -> Config attribute
FILES: dict[str, str] = {
    "vault_config.yaml": "vault",
    "logging.yaml": "logging",
    "vector_config.yaml": "vectors",
    "snapshots.yaml": "snapshots",
    "streams.yaml": "streams",
}


# --------------------------------------------------------------------------- loader
def load_config(override_dir: str | os.PathLike[str] | None = None) -> Config:
    """The shipped defaults, overridden file by file from ``override_dir``."""
    if override_dir is None:
        override_dir = os.environ.get("KFS_CONFIG") or None
    if override_dir is not None and not Path(override_dir).is_dir():
        raise ConfigError(f"config: {override_dir}: not a directory")
    config = Config()
    for filename, attr in FILES.items():
        cls = type(getattr(config, attr))
        merged: dict[str, Any] = {}
        for directory in (SHIPPED_CONFIG_DIR, Path(override_dir) if override_dir else None):
            if directory is None or not (directory / filename).exists():
                continue
            merged = _merge(merged, _read_yaml(directory / filename))
        setattr(config, attr, build(cls, merged, filename, ""))
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    except OSError as e:
        raise ConfigError(f"{path.name}: cannot read ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of keys at the top level")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls: type, data: Any, filename: str, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, naming ``filename`` and key on error."""
    where = prefix.rstrip(".") or "(top level)"
    if not isinstance(data, dict):
        raise ConfigError(f"{filename}: {where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{filename}: {prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {key: _convert(hints[key], value, filename, f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, filename: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    try:
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return _convert(inner, value, filename, key)
        if origin is Literal:
            if value not in args:
                raise ValueError(f"must be one of {', '.join(map(str, args))}, got {value!r}")
            return value
        if origin is list:
            if not isinstance(value, list):
                raise ValueError(f"expected a list, got {type(value).__name__}")
            return [_convert(args[0], v, filename, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {type(value).__name__}")
            return {str(k): _convert(args[1], v, filename, f"{key}.{k}") for k, v in value.items()}
        if dataclasses.is_dataclass(tp):
            return build(tp, {} if value is None else value, filename, f"{key}.")
        if tp is Duration:
            return parse_duration(value)
        if tp is Any:
            return value
        if tp is bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected a whole number, got {value!r}")
            if value < 0:
                raise ValueError(f"cannot be negative, got {value}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"expected a number, got {value!r}")
            if value < 0:
                raise ValueError(f"cannot be negative, got {value}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            return value
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{filename}: {key}: {e}") from None
    raise ConfigError(f"{filename}: {key}: unsupported type {tp!r}")  # a bug in this module


def resolve_data_path(path: str, mount_path_prefix: str = "/data") -> str:
    """``/data/logs/x`` in the seed's config means ``logs/x`` under the mountpoint."""
    if path.startswith(mount_path_prefix + "/"):
        return path[len(mount_path_prefix) + 1 :]
    return path.lstrip("/")
