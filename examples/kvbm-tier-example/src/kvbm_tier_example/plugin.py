"""The plugin module the ``example`` entry point names.

It stays light (no torch at import): the leader only needs the spec, and imports the storage and
handler modules when a worker builds the tier.

Both halves of the tier: the leader sizes it from the option ``mmap_num_blocks`` (off by
default; ``KVBM_MMAP_NUM_BLOCKS``, or ``tier_options: {mmap_num_blocks: N}`` in the kvbm
mapping) and plans copies into it from the GPU only (``stores_from``: its handlers move
GPU <-> mmap); the worker gets a storage and its two handlers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kvbm_core
from kvbm_core import DevicePool, KvbmConfig, Storage, TierContext, TierSpec, TransferHandler
from kvbm_core.tier_options import TierOption, optional, positive_int

TIER_NAME = "mmap"
MEDIUM = "mmap"
OPTIONS = (
    TierOption("mmap_num_blocks", 0, positive_int),
    TierOption("mmap_dir", None, optional(lambda name, value: str(value))),
)


def num_slots(config: KvbmConfig, options: Mapping[str, Any], bytes_per_block: int) -> int:
    return int(options["mmap_num_blocks"])


def make_storage(ctx: TierContext) -> Storage:
    from kvbm_tier_example.storage import MmapStorage

    return MmapStorage.create(ctx)


def make_handlers(storages: Mapping[str, Storage], ctx: TierContext) -> list[TransferHandler]:
    from kvbm_tier_example.handlers import MmapHandler

    pool, mapped = storages[kvbm_core.GPU], storages[MEDIUM]
    if not isinstance(pool, DevicePool):
        raise TypeError(f"storages['gpu'] must be a kvbm_core.DevicePool, got {type(pool).__name__}")
    return [MmapHandler(pool, mapped, store=True), MmapHandler(pool, mapped, store=False)]


@kvbm_core.hookimpl
def kvbm_tier_specs() -> list[TierSpec]:
    return [
        TierSpec(
            name=TIER_NAME,
            medium=MEDIUM,
            level=4,
            make_storage=make_storage,
            make_handlers=make_handlers,
            description="KV blocks in a memory-mapped file (example third-party tier)",
            num_slots=num_slots,
            stores_from=(kvbm_core.GPU,),
            options=OPTIONS,
        )
    ]
