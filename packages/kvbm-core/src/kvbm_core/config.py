"""kvbm configuration from the environment and/or a mapping (e.g. parsed YAML).

Operations (any process):
- ``KvbmConfig.from_env(environ=None, overrides=None)``: read ``KVBM_<NAME>`` or Dynamo's
  ``DYN_KVBM_<NAME>`` (``KVBM_`` wins when both are set), then apply ``overrides``.
- ``KvbmConfig.from_mapping(values)``: keys are field names (``cpu_cache_gb``) or variable
  names with or without a prefix (``CPU_CACHE_GB``, ``DYN_KVBM_CPU_CACHE_GB``).
- ``config.check_disk_dir()``: the disk directory is creatable, writable and private (see
  :mod:`kvbm_core.private_dir`). The default directory is per user, never a shared path.
- ``config.num_cpu_blocks(bytes_per_block)`` / ``num_disk_blocks(...)``: tier sizes in blocks;
  an ``*_OVERRIDE_NUM_BLOCKS`` wins over the size in GB. A tier sized in GB below one block,
  or sized in blocks above ``MAX_CACHE_GB``, is a ``ConfigError`` naming the variable.
- ``unknown_setting_names(environ)``: ``(name as set, suggestion or None)`` for every
  ``KVBM_*`` / ``DYN_KVBM_*`` variable kvbm does not read (lower case counts);
  ``from_env`` logs a warning once per such name, with the closest known name.

Every bad value raises :class:`ConfigError` naming the variable, the value and what is
accepted; every number is bounded (sizes by ``MAX_CACHE_GB``, counts by ``MAX_COUNT``,
seconds by ``MAX_SECONDS``), so no value reaches an allocation or a timer it would overflow.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvbm_core.errors import ConfigError
from kvbm_core.private_dir import default_cache_dir, ensure_private_dir

__all__ = [
    "ConfigError",
    "KvbmConfig",
    "ENV_PREFIXES",
    "MAX_CACHE_GB",
    "MAX_COUNT",
    "MAX_SECONDS",
    "OTHER_SETTING_NAMES",
    "unknown_setting_names",
]

log = logging.getLogger("kvbm.config")

ENV_PREFIXES = ("KVBM_", "DYN_KVBM_")
MAX_CACHE_GB = 1_000_000.0  # 1 PB: far above any host or disk, far below a float overflow
MAX_COUNT = 1 << 40
MAX_SECONDS = 7 * 24 * 3600.0
# Variables that other parts of kvbm read (tier tuning, discovery, the test suite): known
# names, so they draw no "unknown setting" warning, though they are not fields here.
OTHER_SETTING_NAMES = (
    "cpu_pin_threads",
    "cpu_pin_chunk_mib",
    "cpu_huge_pages",
    "cpu_staging_mib",
    "cpu_zero_copy",
    "disk_backend",
    "disk_io_threads",
    "disk_io_depth",
    "disk_index_flush_secs",
    "disk_verify_on_open",
    "disk_verify_in_background",
    "etcd_lease_ttl_secs",
    "require_services",
)
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _fail(name: str, value: Any, accepted: str) -> ConfigError:
    """``name`` is the key as the user spelled it (``DYN_KVBM_CPU_CACHE_GB``, ``cpu_cache_gb``)."""
    return ConfigError(f"{name}={value!r} is invalid: expected {accepted}")


def _parse_size(name: str, value: Any) -> float:
    accepted = f"a number of GB >= 0 and <= {MAX_CACHE_GB:.0f} (1 PB), e.g. 4 or 0.5"
    try:
        size = float(value)
    except (TypeError, ValueError, OverflowError):
        raise _fail(name, value, accepted) from None
    if not (math.isfinite(size) and 0 <= size <= MAX_CACHE_GB):
        raise _fail(name, value, accepted)
    return size


def _parse_count(name: str, value: Any, minimum: int = 0) -> int:
    accepted = f"a whole number >= {minimum} and <= {MAX_COUNT}"
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise _fail(name, value, accepted) from None
    if not minimum <= number <= MAX_COUNT:
        raise _fail(name, value, accepted)
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
    accepted = f"a number of seconds > 0 and <= {MAX_SECONDS:.0f} (7 days)"
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise _fail(name, value, accepted) from None
    if not 0 < seconds <= MAX_SECONDS:
        raise _fail(name, value, accepted)
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


def _parse_endpoints(name: str, value: Any) -> tuple[str, ...]:
    endpoints = _parse_list(name, value)
    if not endpoints:
        raise _fail(name, value, "comma-separated host:port entries, e.g. 127.0.0.1:2379")
    return endpoints


def _parse_token(name: str, value: Any) -> str:
    text = str(value).strip()
    if not _TOKEN.match(text):
        raise _fail(
            name,
            value,
            "letters, digits, '_' or '-' (it becomes a NATS subject token and an etcd key "
            "segment), e.g. kvbm or llama-70b-prod",
        )
    return text


def _parse_host(name: str, value: Any) -> str:
    text = str(value).strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not _HOSTNAME.match(text):
            raise _fail(
                name, value, "an address to listen on: 0.0.0.0 (every interface), 127.0.0.1, "
                "::, or a host name"
            ) from None
    return text


def _parse_choice_free(name: str, value: Any) -> str:
    text = str(value).strip().lower()
    if not text or not text.replace("-", "").replace("_", "").isalnum():
        raise _fail(name, value, "a discovery backend name such as inproc or etcd")
    return text


def _parse_mapping(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    pairs = [item.split("=", 1) for item in _parse_list(name, value)]
    if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
        raise _fail(name, value, "a mapping, or name=value pairs separated by commas")
    return {k.strip(): v.strip() for k, v in pairs}


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
    # Twice the control channel's delivery timeout (60 s of retries through a NATS outage): a
    # completion the channel still delivers is never timed out first; far below the init
    # timeout, which bounds how long a worker waits for the leader's verdict on a failed load.
    job_timeout_secs: float = 120.0
    metrics: bool = False
    metrics_port: int = 6880
    # Every interface, as Dynamo's KVBM: Prometheus scrapes from another host (README: Safety).
    metrics_host: str = "0.0.0.0"
    disable_disk_offload_filter: bool = False
    disk_disable_o_direct: bool = False
    async_load: bool = True
    discovery: str = "inproc"
    discovery_fallback_inproc: bool = False
    namespace: str = "kvbm"
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    etcd_user: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    etcd_ca_cert: str | None = None
    etcd_cert_key: str | None = None
    etcd_cert_cert: str | None = None
    nats_url: str | None = None
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_user: str | None = None
    nats_password: str | None = field(default=None, repr=False)
    # The deployment secret every control message and etcd registration is signed with
    # (kvbm_discovery.control_secret); repr=False keeps it out of logs and tracebacks.
    control_secret: str | None = field(default=None, repr=False)
    control_secret_file: str | None = None
    control_insecure: bool = False
    events: bool = False
    model_id: str | None = None
    disabled_plugins: tuple[str, ...] = ()
    # Raw values of the options tiers declare (kvbm_core.tier_options parses them, per tier).
    tier_options: Mapping[str, Any] = field(default_factory=dict)

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
        return _num_blocks(
            "CPU", self.cpu_cache_gb, self.cpu_cache_override_num_blocks, bytes_per_block
        )

    def num_disk_blocks(self, bytes_per_block: int) -> int:
        return _num_blocks(
            "DISK", self.disk_cache_gb, self.disk_cache_override_num_blocks, bytes_per_block
        )

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
        _warn_unknown_names(env)
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
        close = difflib.get_close_matches(name, list(_PARSERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown kvbm setting {key!r}; known settings: {', '.join(sorted(_PARSERS))}{hint}"
        )
    return name


def _num_blocks(tier: str, gb: float, override: int | None, bytes_per_block: int) -> int:
    if override is not None:
        if override * bytes_per_block > MAX_CACHE_GB * 1e9:
            raise ConfigError(
                f"KVBM_{tier}_CACHE_OVERRIDE_NUM_BLOCKS={override} is "
                f"{override * bytes_per_block / 1e15:.3g} PB at {bytes_per_block} bytes per "
                f"block: expected at most {MAX_CACHE_GB * 1e9 // bytes_per_block:.0f} blocks (1 PB)"
            )
        return override
    num_blocks = int(gb * 1e9 // bytes_per_block)
    if gb > 0 and num_blocks == 0:
        raise ConfigError(
            f"KVBM_{tier}_CACHE_GB={gb:g} is smaller than one block ({bytes_per_block} bytes "
            f"across all ranks): set it to at least {bytes_per_block / 1e9:.3g}, or to 0 to "
            "turn the tier off"
        )
    return num_blocks


_WARNED: set[str] = set()


def unknown_setting_names(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Variables that look like kvbm settings but are not read: ``(name, closest or None)``."""
    known = [*_PARSERS, *OTHER_SETTING_NAMES]
    found: list[tuple[str, str | None]] = []
    for key in environ:
        upper = key.upper()
        prefix = next((p for p in ENV_PREFIXES if upper.startswith(p)), None)
        if prefix is None:
            continue
        name = upper[len(prefix) :].lower()
        if name in known:
            if key != upper:  # kvbm_cpu_cache_gb: environment names are case-sensitive
                found.append((key, upper))
            continue
        close = difflib.get_close_matches(name, known, n=1)
        found.append((key, prefix + close[0].upper() if close else None))
    return found


def _warn_unknown_names(environ: Mapping[str, str]) -> None:
    for key, suggestion in unknown_setting_names(environ):
        if key in _WARNED:
            continue
        _WARNED.add(key)
        hint = f"did you mean {suggestion}?" if suggestion else "see the README's Configuration"
        log.warning("kvbm: %s is not a kvbm setting and is ignored; %s", key, hint)


_PARSERS: dict[str, Any] = {
    "cpu_cache_gb": _parse_size,
    "disk_cache_gb": _parse_size,
    "disk_cache_dir": _parse_text,
    "cpu_cache_override_num_blocks": _parse_count,
    "disk_cache_override_num_blocks": _parse_count,
    "leader_worker_init_timeout_secs": _parse_seconds,
    "job_timeout_secs": _parse_seconds,
    "metrics": _parse_bool,
    "metrics_port": _parse_port,
    "metrics_host": _parse_host,
    "disable_disk_offload_filter": _parse_bool,
    "disk_disable_o_direct": _parse_bool,
    "async_load": _parse_bool,
    "discovery": _parse_choice_free,
    "discovery_fallback_inproc": _parse_bool,
    "namespace": _parse_token,
    "etcd_endpoints": _parse_endpoints,
    "etcd_user": _parse_optional_text,
    "etcd_password": _parse_optional_text,
    "etcd_ca_cert": _parse_optional_text,
    "etcd_cert_key": _parse_optional_text,
    "etcd_cert_cert": _parse_optional_text,
    "nats_url": _parse_optional_text,
    "nats_creds": _parse_optional_text,
    "nats_tls_ca": _parse_optional_text,
    "nats_user": _parse_optional_text,
    "nats_password": _parse_optional_text,
    "control_secret": _parse_optional_text,
    "control_secret_file": _parse_optional_text,
    "control_insecure": _parse_bool,
    "events": _parse_bool,
    "model_id": _parse_optional_text,
    "disabled_plugins": _parse_list,
    "tier_options": _parse_mapping,
}
assert set(_PARSERS) == {f.name for f in fields(KvbmConfig)}
