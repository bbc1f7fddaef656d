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

Tuning (``OPTIONS``, parsed once by :mod:`kvbm_core.tier_options`: ``ctx.options``, else the
``tier_options`` mapping, else ``KVBM_`` / ``DYN_KVBM_`` in the environment):
``cpu_pin_threads`` (8), ``cpu_pin_chunk_mib`` (1024), ``cpu_huge_pages`` (true),
``cpu_staging_mib`` (64, per staging buffer; each direction holds two on the GPU),
``cpu_zero_copy`` (auto: scattered host slots move with a zero-copy Triton kernel where Triton
and the driver allow it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kvbm_core
from kvbm_core.config import KvbmConfig
from kvbm_core.plugins import TierContext, TierSpec
from kvbm_core.regions import RegionPool
from kvbm_core.tier_options import TierOption, auto_flag, flag, positive_int, read_tier_options
from kvbm_core.transfer import CPU, GPU, DevicePool, Storage, TransferHandler
from kvbm_tiers_cpu.handlers import DEFAULT_STAGING_BYTES, GpuToHostHandler, HostToGpuHandler
from kvbm_tiers_cpu.storage import PinnedHostStorage

__all__ = ["kvbm_tier_specs", "make_storage", "make_handlers", "check_options", "OPTIONS"]

_MAX_OPTION = 1 << 20  # MiB or threads: far above any machine, far below an overflow
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


OPTIONS = (
    TierOption("cpu_pin_threads", 8, positive_int),
    TierOption("cpu_pin_chunk_mib", 1024, positive_int),
    TierOption("cpu_huge_pages", True, flag),
    TierOption("cpu_staging_mib", DEFAULT_STAGING_BYTES >> 20, positive_int),
    TierOption("cpu_zero_copy", None, auto_flag),
)


def check_options(ctx: TierContext) -> dict[str, Any]:
    """Every tuning option, parsed (``ConfigError`` naming a bad one): what ``make_storage``
    and ``make_handlers`` use, and what ``kvbm doctor`` checks.

    Parsed by :func:`kvbm_core.tier_options.read_tier_options`: ``ctx.options`` (what core
    parsed for this tier, or values a caller sets) wins over the config and the environment.
    """
    values = read_tier_options(OPTIONS, ctx.config, given=ctx.options)
    return {
        "pin_threads": values["cpu_pin_threads"],
        "pin_chunk_bytes": values["cpu_pin_chunk_mib"] << 20,
        "huge_pages": values["cpu_huge_pages"],
        "staging_bytes": values["cpu_staging_mib"] << 20,
        "zero_copy": values["cpu_zero_copy"],
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
    if not isinstance(pool, DevicePool | RegionPool):
        raise TypeError(
            f"storages['gpu'] must be a kvbm_core DevicePool or RegionPool, got {type(pool).__name__}"
        )
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
            options=OPTIONS,
        )
    ]
