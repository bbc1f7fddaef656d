"""The disk tier (G3) as a kvbm plugin: entry point ``disk`` in group ``kvbm``.

``kvbm_tier_specs`` is called by the leader and by every worker. ``make_storage`` opens one
rank's ``DiskStorage`` under ``config.disk_cache_dir``; ``make_handlers`` returns the handlers
for cpu -> disk and disk -> cpu (when the worker has a cpu tier) and gpu -> disk and
disk -> gpu (when it has a GPU pool).

The leader's half: sized by ``KVBM_DISK_CACHE_GB`` / ``KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS``;
written from the cpu tier (write-back) or the GPU; admits blocks sighted twice unless
``KVBM_DISABLE_DISK_OFFLOAD_FILTER``; persistent (its blocks are restored after a restart).

Knobs read from ``TierContext.options`` (all optional; declared in ``OPTIONS``, so core fills
them from ``KVBM_DISK_IO_THREADS`` and so on, or from ``tier_options`` in the kvbm mapping):
``disk_io_threads`` (blocks in flight
per direction, default 16), ``disk_io_depth`` (cap on I/O syscalls in flight, default none),
``disk_index_flush_secs`` (default 1: a stored block is in the index within a second), ``disk_verify_on_open``
(read each persisted slot's header at start, default false: one read per block, minutes at
10^6 blocks; every load verifies its slot anyway, so a stale entry costs a failed load),
``disk_verify_in_background`` (read them after start instead, one at a time, default false), ``disk_backend`` (host <-> disk
I/O: ``auto`` = NIXL when importable else threads, ``nixl``, ``threads``; also env
``KVBM_DISK_BACKEND``; GPU <-> disk always uses threads). ``check_options(ctx)`` checks them
all (what ``make_storage`` does first, and what ``kvbm doctor`` runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import kvbm_core
from kvbm_core.admission import AdmissionPolicy, AlwaysAdmit, FrequencyFilter
from kvbm_core.config import ENV_PREFIXES, ConfigError, KvbmConfig
from kvbm_core.plugins import TierContext, TierSpec
from kvbm_core.tier_options import TierOption, flag, optional, positive_float, positive_int
from kvbm_core.transfer import CPU, DISK, GPU, DevicePool, Storage, TransferHandler
from kvbm_tiers_disk.handlers import (
    DEFAULT_IO_THREADS,
    DiskToGpuHandler,
    DiskToHostHandler,
    GpuToDiskHandler,
    HostToDiskHandler,
)
from kvbm_tiers_disk.nixl_handlers import NixlDiskToHostHandler, NixlHostToDiskHandler
from kvbm_tiers_disk.nixl_io import INSTALL_HINT, load_nixl
from kvbm_tiers_disk.storage import DiskStorage

__all__ = [
    "kvbm_tier_specs",
    "make_storage",
    "make_handlers",
    "tier_option",
    "disk_backend",
    "requested_backend",
    "check_options",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nixl", "threads")


def tier_option(ctx: TierContext, name: str, default: Any) -> Any:
    """``ctx.options[name]``, else ``KVBM_<NAME>`` / ``DYN_KVBM_<NAME>``, else ``default``."""
    if name in ctx.options:
        return ctx.options[name]
    for prefix in ENV_PREFIXES:
        value = os.environ.get(prefix + name.upper(), "").strip()
        if value:
            return value
    return default


def requested_backend(ctx: TierContext) -> str:
    """``disk_backend`` as set (``auto`` when unset); ``ConfigError`` for an unknown value."""
    value = tier_option(ctx, "disk_backend", "auto")
    choice = str(value).strip().lower()
    if choice not in BACKENDS:
        raise ConfigError(
            f"disk_backend / KVBM_DISK_BACKEND={value!r} is invalid: expected one of {', '.join(BACKENDS)}"
        )
    return choice


def disk_backend(ctx: TierContext) -> str:
    """``"nixl"`` or ``"threads"``: what moves host <-> disk bytes (``ConfigError`` for an
    unknown value, or for ``nixl`` asked for where it is not installed)."""
    choice = requested_backend(ctx)
    is_available = load_nixl() is not None
    if choice == "nixl" and not is_available:
        raise ConfigError(
            f"disk_backend=nixl but the nixl Python package is not importable; {INSTALL_HINT}"
        )
    if choice == "auto":
        return "nixl" if is_available else "threads"
    return choice


_MAX_OPTION = 1_000_000  # far above any sane thread count or interval; no timer overflows


def _option(ctx: TierContext, name: str, default: float, kind: type) -> float:
    value = ctx.options.get(name, default)
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not 0 < number <= _MAX_OPTION:
        raise ConfigError(
            f"tier option {name}={value!r} is invalid: expected a number > 0 and <= {_MAX_OPTION}"
        )
    return number


def _bool_option(ctx: TierContext, name: str) -> bool:
    verify = ctx.options.get(name, False)
    if not isinstance(verify, bool):
        raise ConfigError(f"tier option {name}={verify!r} is invalid: expected a bool")
    return verify


def check_options(ctx: TierContext) -> str:
    """Check every option the disk tier reads (``ConfigError`` naming a bad one), as
    ``make_storage`` does at start; the host <-> disk backend it will use."""
    _option(ctx, "disk_io_threads", DEFAULT_IO_THREADS, int)
    _option(ctx, "disk_index_flush_secs", 1.0, float)
    _bool_option(ctx, "disk_verify_on_open")
    _bool_option(ctx, "disk_verify_in_background")
    _io_depth(ctx)
    return disk_backend(ctx)


def make_storage(ctx: TierContext) -> DiskStorage:
    config = ctx.config or KvbmConfig()
    check_options(ctx)  # fail at start, not when the handlers are made
    return DiskStorage(
        ctx.layout,
        ctx.num_slots,
        config.disk_cache_dir,
        rank=ctx.rank,
        world_size=ctx.world_size,
        use_o_direct=not config.disk_disable_o_direct,
        index_flush_secs=_option(ctx, "disk_index_flush_secs", 1.0, float),
        verify_on_open=_bool_option(ctx, "disk_verify_on_open"),
        verify_in_background=_bool_option(ctx, "disk_verify_in_background"),
        io_depth=_io_depth(ctx),
        model_id=config.model_id,
    )


def _io_depth(ctx: TierContext) -> int | None:
    if ctx.options.get("disk_io_depth") is None:
        return None
    return int(_option(ctx, "disk_io_depth", 0, int))


def make_handlers(storages: Mapping[str, Storage], ctx: TierContext) -> list[TransferHandler]:
    disk = storages[DISK]
    if not isinstance(disk, DiskStorage):
        raise TypeError(f"the disk tier's handlers need a DiskStorage, got {type(disk).__name__}")
    num_threads = int(_option(ctx, "disk_io_threads", DEFAULT_IO_THREADS, int))
    handlers: list[TransferHandler] = []
    host = storages.get(CPU)
    if host is not None:
        handlers += _host_handlers(host.host_view(), disk, num_threads, ctx)
    pool = storages.get(GPU)
    if pool is not None:
        if not isinstance(pool, DevicePool):
            raise TypeError(f"the gpu storage must be a DevicePool, got {type(pool).__name__}")
        handlers += [
            GpuToDiskHandler(pool, disk, num_threads),
            DiskToGpuHandler(pool, disk, num_threads),
        ]
    return handlers


def _host_handlers(
    rows: Any, disk: DiskStorage, num_threads: int, ctx: TierContext
) -> list[TransferHandler]:
    if disk_backend(ctx) == "nixl":
        nixl: list[TransferHandler] = []
        try:
            nixl.append(NixlHostToDiskHandler(rows, disk, num_threads))
            nixl.append(NixlDiskToHostHandler(rows, disk, num_threads))
        except ConfigError:
            for handler in nixl:
                handler.close()
            if requested_backend(ctx) == "nixl":
                raise  # asked for by name: say why it cannot be
            log.warning(
                "kvbm disk tier: NIXL is installed but did not start; using I/O threads",
                exc_info=True,
            )
        else:
            return nixl
    return [HostToDiskHandler(rows, disk, num_threads), DiskToHostHandler(rows, disk, num_threads)]


OPTIONS = (
    TierOption("disk_io_threads", DEFAULT_IO_THREADS, positive_int),
    TierOption("disk_io_depth", None, optional(positive_int)),
    TierOption("disk_index_flush_secs", 1.0, positive_float),
    TierOption("disk_verify_on_open", False, flag),
    TierOption("disk_verify_in_background", False, flag),
    TierOption("disk_backend", "auto", lambda name, value: str(value)),
)


def num_slots(config: KvbmConfig, options: Mapping[str, Any], bytes_per_block: int) -> int:
    return config.num_disk_blocks(bytes_per_block) if config.disk_enabled else 0


def make_admission(config: KvbmConfig) -> AdmissionPolicy:
    return AlwaysAdmit() if config.disable_disk_offload_filter else FrequencyFilter()


@kvbm_core.hookimpl
def kvbm_tier_specs() -> list[TierSpec]:
    return [
        TierSpec(
            name="disk",
            medium=DISK,
            level=3,
            make_storage=make_storage,
            make_handlers=make_handlers,
            description="G3: local disk, O_DIRECT slots with per-block checksums and a persistent index",
            requires=(CPU,),
            num_slots=num_slots,
            stores_from=(CPU, GPU),
            make_admission=make_admission,
            is_persistent=True,
            options=OPTIONS,
        )
    ]
