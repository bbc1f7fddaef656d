"""The plugin module the ``example`` entry point names.

It stays light (no torch at import): the leader only needs the spec, and imports the storage and
handler modules when a worker builds the tier.
"""

from __future__ import annotations

from collections.abc import Mapping

import kvbm_core
from kvbm_core import DevicePool, Storage, TierContext, TierSpec, TransferHandler

TIER_NAME = "mmap"
MEDIUM = "mmap"


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
        )
    ]
