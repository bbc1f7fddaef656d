"""The disk tier (G3) as a kvbm plugin: entry point ``disk`` in group ``kvbm``.

``kvbm_tier_specs`` is called by the leader and by every worker. ``make_storage`` opens one
rank's ``DiskStorage`` under ``config.disk_cache_dir``; ``make_handlers`` returns the handlers
for cpu -> disk and disk -> cpu (when the worker has a cpu tier) and gpu -> disk and
disk -> gpu (when it has a GPU pool).

Knobs read from ``TierContext.options`` (all optional): ``disk_io_threads`` (blocks in flight
per direction, default 16), ``disk_io_depth`` (cap on I/O syscalls in flight, default none),
``disk_index_flush_secs`` (default 5), ``disk_verify_on_open``
(check each persisted slot's header at start, default true).
"""

from __future__ import annotations

from collections.abc import Mapping

import kvbm_core
from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.plugins import TierContext, TierSpec
from kvbm_core.transfer import CPU, DISK, GPU, DevicePool, Storage, TransferHandler
from kvbm_tiers_disk.handlers import (
    DEFAULT_IO_THREADS,
    DiskToGpuHandler,
    DiskToHostHandler,
    GpuToDiskHandler,
    HostToDiskHandler,
)
from kvbm_tiers_disk.storage import DiskStorage

__all__ = ["kvbm_tier_specs", "make_storage", "make_handlers"]


def _option(ctx: TierContext, name: str, default: float, kind: type) -> float:
    value = ctx.options.get(name, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0:
        raise ConfigError(f"tier option {name}={value!r} is invalid: expected a number > 0")
    return number


def make_storage(ctx: TierContext) -> DiskStorage:
    config = ctx.config or KvbmConfig()
    _option(ctx, "disk_io_threads", DEFAULT_IO_THREADS, int)  # fail at start, not at handlers
    verify = ctx.options.get("disk_verify_on_open", True)
    if not isinstance(verify, bool):
        raise ConfigError(f"tier option disk_verify_on_open={verify!r} is invalid: expected a bool")
    return DiskStorage(
        ctx.layout,
        ctx.num_slots,
        config.disk_cache_dir,
        rank=ctx.rank,
        world_size=ctx.world_size,
        use_o_direct=not config.disk_disable_o_direct,
        index_flush_secs=_option(ctx, "disk_index_flush_secs", 5.0, float),
        verify_on_open=verify,
        io_depth=_io_depth(ctx),
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
        rows = host.host_view()
        handlers += [
            HostToDiskHandler(rows, disk, num_threads),
            DiskToHostHandler(rows, disk, num_threads),
        ]
    pool = storages.get(GPU)
    if pool is not None:
        if not isinstance(pool, DevicePool):
            raise TypeError(f"the gpu storage must be a DevicePool, got {type(pool).__name__}")
        handlers += [
            GpuToDiskHandler(pool, disk, num_threads),
            DiskToGpuHandler(pool, disk, num_threads),
        ]
    return handlers


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
        )
    ]
