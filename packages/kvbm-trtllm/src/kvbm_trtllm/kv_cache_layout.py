"""TensorRT-LLM's KVCacheManagerV2 layout description, real when importable, else stand-ins.

What this module provides (the worker process and the reference executor import it):
- ``KvCacheBufferRef`` / ``KvCacheRegion`` / ``KvCacheLayerGroupLayout`` / ``KvCacheLayout``:
  what ``register_kv_cache_layout`` receives on KVCacheManagerV2, as
  ``tensorrt_llm/_torch/pyexecutor/connectors/kv_cache_layout.py``@0972960b defines it: per
  layer group its layer ids, window size, ``regions`` and ``replicated_regions``; a region's
  slot ``i`` is ``size`` bytes at ``base + stride * i`` (``as_tensor()`` is the
  ``[num_slots, size]`` uint8 view); ``gpu_pool_mapping_bytes`` is the size of one
  ``cuMemCreate`` mapping, tiled from each pool's reservation base.
- ``valid_page_slots(page_indices)``: ``(block ordinal, page slot)`` for entries that address
  a page, dropping ``BAD_PAGE_INDEX`` (``-1``) entries, as the same file does.
- ``BAD_PAGE_INDEX``: ``-1``, what a by-layer-group list holds for a block with no page.

The stand-ins (no TensorRT-LLM installed) have the same fields; a region built by the reference
executor also keeps the tensor it describes (``owner``, not compared), so ``as_tensor()`` works
for CPU memory too. TensorRT-LLM releases before the connector's V2 support (1.2, early 1.3)
have no such module; the stand-ins are used then, and such an engine never calls
``register_kv_cache_layout``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

__all__ = [
    "BAD_PAGE_INDEX",
    "HAS_TRTLLM_LAYOUT",
    "KvCacheBufferRef",
    "KvCacheRegion",
    "KvCacheLayerGroupLayout",
    "KvCacheLayout",
    "valid_page_slots",
]

BAD_PAGE_INDEX = -1


def _import_real() -> Any:
    try:
        from tensorrt_llm._torch.pyexecutor.connectors import (  # type: ignore[import-not-found]
            kv_cache_layout,
        )
    except ImportError:
        return None
    return kv_cache_layout


_real = _import_real()
HAS_TRTLLM_LAYOUT = _real is not None

if TYPE_CHECKING or _real is None:

    @dataclass(frozen=True)
    class KvCacheBufferRef:
        """One ``(layer, role)`` buffer a region covers, in memory order."""

        layer_id: int
        role: str
        expansion: int = 1

    @dataclass(frozen=True)
    class KvCacheRegion:
        """A byte range repeating once per page slot: slot ``i`` at ``base + stride * i``."""

        base: int
        size: int
        stride: int
        num_slots: int
        buffers: tuple[KvCacheBufferRef, ...]
        owner: Any = field(default=None, compare=False, repr=False)

        def address_of(self, slot_id: int) -> int:
            if not 0 <= slot_id < self.num_slots:
                raise IndexError(f"slot_id {slot_id} out of range [0, {self.num_slots})")
            return self.base + self.stride * slot_id

        def as_tensor(self, dtype: Any = None) -> Any:
            """A strided ``[num_slots, size]`` uint8 view; row ``i`` is slot ``i``."""
            import torch

            if self.owner is None:
                raise ValueError(
                    "this stand-in KvCacheRegion was built from an address only; build it with "
                    "owner=<the tensor it describes> to view it"
                )
            u8 = self.owner.view(torch.uint8).reshape(-1)
            offset = self.base - u8.data_ptr()
            view = u8.as_strided((self.num_slots, self.size), (self.stride, 1), offset)
            return view if dtype is None or dtype == torch.uint8 else view.view(dtype)

    @dataclass(frozen=True)
    class KvCacheLayerGroupLayout:
        """One layer group: the unit page indices are scoped to."""

        layer_group_id: int
        layer_ids: tuple[int, ...]
        window_size: int | None
        regions: tuple[KvCacheRegion, ...]
        replicated_regions: tuple[KvCacheRegion, ...] = ()

        @property
        def bytes_per_page(self) -> int:
            return sum(region.size for region in self.regions)

        @property
        def replicated_bytes_per_page(self) -> int:
            return sum(region.size for region in self.replicated_regions)

    @dataclass(frozen=True)
    class KvCacheLayout:
        """What a connector is handed in place of a single KV cache pool tensor."""

        tokens_per_block: int
        groups: tuple[KvCacheLayerGroupLayout, ...]
        gpu_pool_mapping_bytes: int | None = None

        def group(self, layer_group_id: int) -> KvCacheLayerGroupLayout:
            for group in self.groups:
                if group.layer_group_id == layer_group_id:
                    return group
            raise KeyError(f"no layer group {layer_group_id} in layout")

        def group_of_layer(self, layer_id: int) -> KvCacheLayerGroupLayout:
            for group in self.groups:
                if layer_id in group.layer_ids:
                    return group
            raise KeyError(f"layer {layer_id} is not covered by this layout")

    def valid_page_slots(page_indices: Iterable[int]) -> Iterator[tuple[int, int]]:
        """``(block ordinal, page slot)`` of the entries that address a page."""
        for ordinal, slot in enumerate(page_indices):
            if slot >= 0:
                yield ordinal, slot

else:
    KvCacheBufferRef = _real.KvCacheBufferRef
    KvCacheRegion = _real.KvCacheRegion
    KvCacheLayerGroupLayout = _real.KvCacheLayerGroupLayout
    KvCacheLayout = _real.KvCacheLayout
    valid_page_slots = getattr(_real, "valid_page_slots", None) or (
        lambda page_indices: ((i, s) for i, s in enumerate(page_indices) if s >= 0)
    )
