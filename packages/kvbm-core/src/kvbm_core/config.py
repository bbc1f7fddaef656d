"""kvbm configuration from the environment and/or a mapping (e.g. parsed YAML).

Operations (any process):
- ``KvbmConfig.from_env(environ=None, overrides=None)``: read ``KVBM_<NAME>`` or Dynamo's
  ``DYN_KVBM_<NAME>`` (``KVBM_`` wins when both are set), then apply ``overrides``.
- ``KvbmConfig.from_mapping(values)``: keys are field names (``cpu_cache_gb``) or variable
  names with or without a prefix (``CPU_CACHE_GB``, ``DYN_KVBM_CPU_CACHE_GB``).
- ``config.check_disk_dir()``: the disk directory is creatable, writable and private (see
  :mod:`kvbm_core.private_dir`). The default directory is per user, never a shared path.
- ``config.num_cpu_blocks(bytes_per_block)`` / ``num_disk_blocks(...)``: tier sizes in blocks;
  an ``*_OVERRIDE_NUM_BLOCKS`` wins over the size in GB.

Every bad value raises :class:`ConfigError` naming the variable, the value and what is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvbm_core.errors import ConfigError
from kvbm_core.private_dir import default_cache_dir, ensure_private_dir

__all__ = ["ConfigError", "KvbmConfig", "ENV_PREFIXES"]

ENV_PREFIXES = ("KVBM_", "DYN_KVBM_")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _fail(name: str, value: Any, accepted: str) -> ConfigError:
    """``name`` is the key as the user spelled it (``DYN_KVBM_CPU_CACHE_GB``, ``cpu_cache_gb``)."""
    return ConfigError(f"{name}={value!r} is invalid: expected {accepted}")


def _parse_size(name: str, value: Any) -> float:
    try:
        size = float(value)
    except (TypeError, ValueError):
        raise _fail(name, value, "a number of GB >= 0, e.g. 4 or 0.5") from None
    if size < 0 or size != size or size == float("inf"):
        raise _fail(name, value, "a number of GB >= 0, e.g. 4 or 0.5")
    return size


def _parse_count(name: str, value: Any, minimum: int = 0) -> int:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise _fail(name, value, f"a whole number >= {minimum}") from None
    if number < minimum:
        raise _fail(name, value, f"a whole number >= {minimum}")
    return number


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _fail(name, value, "true/false (1/0, yes/no, on/off)")


def _parse_seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise _fail(name, value, "a number of seconds > 0") from None
    if not seconds > 0:
        raise _fail(name, value, "a number of seconds > 0")
    return seconds


def _parse_port(name: str, value: Any) -> int:
    port = _parse_count(name, value, 1)
    if port > 65535:
        raise _fail(name, value, "a TCP port 1..65535")
    return port


def _parse_list(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _parse_choice_free(name: str, value: Any) -> str:
    text = str(value).strip().lower()
    if not text or not text.replace("-", "").replace("_", "").isalnum():
        raise _fail(name, value, "a discovery backend name such as inproc or etcd")
    return text


def _parse_text(name: str, value: Any) -> str:
    return str(value)


def _parse_optional_text(name: str, value: Any) -> str | None:
    text = str(value).strip()
    return text or None


@dataclass(frozen=True)
class KvbmConfig:
    cpu_cache_gb: float = 0.0
    disk_cache_gb: float = 0.0
    disk_cache_dir: str = field(default_factory=default_cache_dir)
    cpu_cache_override_num_blocks: int | None = None
    disk_cache_override_num_blocks: int | None = None
    leader_worker_init_timeout_secs: float = 1800.0
    metrics: bool = False
    metrics_port: int = 6880
    disable_disk_offload_filter: bool = False
    disk_disable_o_direct: bool = False
    async_load: bool = True
    discovery: str = "inproc"
    discovery_fallback_inproc: bool = False
    namespace: str = "kvbm"
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    etcd_user: str | None = None
    etcd_password: str | None = None
    etcd_ca_cert: str | None = None
    etcd_cert_key: str | None = None
    etcd_cert_cert: str | None = None
    nats_url: str | None = None
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    events: bool = False
    model_id: str | None = None
    disabled_plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.disk_enabled and not self.cpu_enabled:
            raise ConfigError(
                "a disk tier needs a CPU tier: KVBM_DISK_CACHE_GB / "
                "KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS is set but KVBM_CPU_CACHE_GB and "
                "KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS are not; set one of them (as Dynamo's "
                "KVBM guide requires)"
            )

    # An override wins over the size in GB, also when it is 0 (the tier is then off).
    @property
    def cpu_enabled(self) -> bool:
        if self.cpu_cache_override_num_blocks is not None:
            return self.cpu_cache_override_num_blocks > 0
        return self.cpu_cache_gb > 0

    @property
    def disk_enabled(self) -> bool:
        if self.disk_cache_override_num_blocks is not None:
            return self.disk_cache_override_num_blocks > 0
        return self.disk_cache_gb > 0

    def num_cpu_blocks(self, bytes_per_block: int) -> int:
        """Blocks of the CPU tier when every rank's share of a block adds up to ``bytes_per_block``."""
        if self.cpu_cache_override_num_blocks is not None:
            return self.cpu_cache_override_num_blocks
        return int(self.cpu_cache_gb * 1e9 // bytes_per_block)

    def num_disk_blocks(self, bytes_per_block: int) -> int:
        if self.disk_cache_override_num_blocks is not None:
            return self.disk_cache_override_num_blocks
        return int(self.disk_cache_gb * 1e9 // bytes_per_block)

    def check_disk_dir(self) -> Path:
        """Create the disk directory (0700) if needed; prove it private and writable."""
        return ensure_private_dir(Path(self.disk_cache_dir))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> KvbmConfig:
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            name = _field_name(key)
            if value is None:
                continue
            parsed[name] = _PARSERS[name](key.strip(), value)
        return cls(**parsed)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> KvbmConfig:
        env = os.environ if environ is None else environ
        # field -> (the key as spelled, value), so an error names the variable actually set
        chosen: dict[str, tuple[str, Any]] = {}
        for name in _PARSERS:
            for prefix in reversed(ENV_PREFIXES):
                var = prefix + name.upper()
                if var in env and env[var].strip() != "":
                    chosen[name] = (var, env[var])
        for key, value in (overrides or {}).items():
            chosen[_field_name(key)] = (key, value)
        return cls.from_mapping(dict(chosen.values()))

    def replace(self, **changes: Any) -> KvbmConfig:
        return replace(self, **changes)


def _field_name(key: str) -> str:
    name = key.strip()
    upper = name.upper()
    for prefix in ENV_PREFIXES:
        if upper.startswith(prefix):
            name = name[len(prefix) :]
            break
    name = name.lower()
    if name not in _PARSERS:
        raise ConfigError(
            f"unknown kvbm setting {key!r}; known settings: {', '.join(sorted(_PARSERS))}"
        )
    return name


_PARSERS: dict[str, Any] = {
    "cpu_cache_gb": _parse_size,
    "disk_cache_gb": _parse_size,
    "disk_cache_dir": _parse_text,
    "cpu_cache_override_num_blocks": _parse_count,
    "disk_cache_override_num_blocks": _parse_count,
    "leader_worker_init_timeout_secs": _parse_seconds,
    "metrics": _parse_bool,
    "metrics_port": _parse_port,
    "disable_disk_offload_filter": _parse_bool,
    "disk_disable_o_direct": _parse_bool,
    "async_load": _parse_bool,
    "discovery": _parse_choice_free,
    "discovery_fallback_inproc": _parse_bool,
    "namespace": _parse_text,
    "etcd_endpoints": _parse_list,
    "etcd_user": _parse_optional_text,
    "etcd_password": _parse_optional_text,
    "etcd_ca_cert": _parse_optional_text,
    "etcd_cert_key": _parse_optional_text,
    "etcd_cert_cert": _parse_optional_text,
    "nats_url": _parse_optional_text,
    "nats_creds": _parse_optional_text,
    "nats_tls_ca": _parse_optional_text,
    "events": _parse_bool,
    "model_id": _parse_optional_text,
    "disabled_plugins": _parse_list,
}
assert set(_PARSERS) == {f.name for f in fields(KvbmConfig)}
