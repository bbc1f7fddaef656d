"""The ``cpu`` tier plugin (entry point ``cpu`` in group ``kvbm``).

``kvbm_tier_specs()`` contributes tier ``cpu`` (level 2, the top tier), sized by
``KVBM_CPU_CACHE_GB`` / ``KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS`` and written from the GPU:
- ``make_storage(ctx)``: a :class:`PinnedHostStorage` of ``ctx.num_slots`` slots for rank
  ``ctx.rank``; pinned (in the background) when ``ctx.device`` is a CUDA device, plain memory
  otherwise; it serves from each range as soon as that range is pinned. Pinning that makes no
  progress for ``config.leader_worker_init_timeout_secs`` fails the tier (a stall bound, not a
  bound on the total pinning time, so it does not cap the tier's size).
- ``make_handlers(storages, ctx)``: the ``gpu -> cpu`` and ``cpu -> gpu`` handlers over
  ``storages["gpu"]`` (the engine's pool) and ``storages["cpu"]``.

Tuning, from ``ctx.options`` or else the environment (``KVBM_`` or ``DYN_KVBM_`` prefix):
``cpu_pin_threads`` (8), ``cpu_pin_chunk_mib`` (1024), ``cpu_huge_pages`` (true),
``cpu_staging_mib`` (64, per staging buffer; each direction holds two on the GPU),
``cpu_zero_copy`` (auto: scattered host slots move with a zero-copy Triton kernel where Triton
and the driver allow it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import kvbm_core
from kvbm_core.config import ENV_PREFIXES, ConfigError, KvbmConfig
from kvbm_core.plugins import TierContext, TierSpec
from kvbm_core.tier_options import auto_flag
from kvbm_core.transfer import CPU, GPU, DevicePool, Storage, TransferHandler
from kvbm_tiers_cpu.handlers import DEFAULT_STAGING_BYTES, GpuToHostHandler, HostToGpuHandler
from kvbm_tiers_cpu.storage import PinnedHostStorage

__all__ = ["kvbm_tier_specs", "make_storage", "make_handlers", "tier_option", "check_options"]

_MAX_OPTION = 1 << 20  # MiB or threads: far above any machine, far below an overflow
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def tier_option(ctx: TierContext, name: str, default: Any, parse: Callable[[str, Any], Any]) -> Any:
    """``ctx.options[name]``, else ``KVBM_<NAME>`` / ``DYN_KVBM_<NAME>``, else ``default``."""
    if name in ctx.options:
        return parse(name, ctx.options[name])
    for prefix in ENV_PREFIXES:
        value = os.environ.get(prefix + name.upper(), "").strip()
        if value:
            return parse(prefix + name.upper(), value)
    return default


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if not 0 < number <= _MAX_OPTION:
        raise ConfigError(
            f"{name}={value!r} is invalid: expected a whole number > 0 and <= {_MAX_OPTION}"
        )
    return number


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ConfigError(f"{name}={value!r} is invalid: expected true/false (1/0, yes/no, on/off)")


def check_options(ctx: TierContext) -> dict[str, Any]:
    """Every tuning option, parsed (``ConfigError`` naming a bad one): what ``make_storage``
    and ``make_handlers`` use, and what ``kvbm doctor`` checks."""
    return {
        "pin_threads": tier_option(ctx, "cpu_pin_threads", 8, _positive_int),
        "pin_chunk_bytes": tier_option(ctx, "cpu_pin_chunk_mib", 1024, _positive_int) << 20,
        "huge_pages": tier_option(ctx, "cpu_huge_pages", True, _flag),
        "staging_bytes": tier_option(
            ctx, "cpu_staging_mib", DEFAULT_STAGING_BYTES >> 20, _positive_int
        ) << 20,
        "zero_copy": tier_option(ctx, "cpu_zero_copy", None, auto_flag),
    }


def make_storage(ctx: TierContext) -> PinnedHostStorage:
    timeout = ctx.config.leader_worker_init_timeout_secs if ctx.config is not None else 1800.0
    options = check_options(ctx)
    return PinnedHostStorage(
        ctx.layout,
        ctx.num_slots,
        pin=str(ctx.device).startswith("cuda"),
        rank=ctx.rank,
        init_timeout_s=timeout,
        pin_threads=options["pin_threads"],
        pin_chunk_bytes=options["pin_chunk_bytes"],
        huge_pages=options["huge_pages"],
    )


def make_handlers(storages: Mapping[str, Storage], ctx: TierContext) -> list[TransferHandler]:
    pool, host = storages[GPU], storages[CPU]
    if not isinstance(pool, DevicePool):
        raise TypeError(f"storages['gpu'] must be a kvbm_core.DevicePool, got {type(pool).__name__}")
    if not isinstance(host, PinnedHostStorage):
        raise TypeError(
            f"storages['cpu'] must be the cpu tier's PinnedHostStorage, got {type(host).__name__}"
        )
    options = check_options(ctx)
    staging_bytes, zero_copy = options["staging_bytes"], options["zero_copy"]
    return [
        GpuToHostHandler(pool, host, staging_bytes=staging_bytes, zero_copy=zero_copy),
        HostToGpuHandler(pool, host, staging_bytes=staging_bytes, zero_copy=zero_copy),
    ]


def num_slots(config: KvbmConfig, options: Mapping[str, Any], bytes_per_block: int) -> int:
    return config.num_cpu_blocks(bytes_per_block) if config.cpu_enabled else 0


@kvbm_core.hookimpl
def kvbm_tier_specs() -> list[TierSpec]:
    return [
        TierSpec(
            name="cpu",
            medium=CPU,
            level=2,
            make_storage=make_storage,
            make_handlers=make_handlers,
            description="G2: pinned host memory, batched GPU<->host copies on dedicated streams",
            num_slots=num_slots,
            stores_from=(GPU,),
        )
    ]
