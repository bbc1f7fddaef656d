"""Layer groups of the V2 profile: KVCacheManagerV2's one page space per attention window.

KVCacheManagerV2 (``connectors/kv_cache_layout.py``@0972960b) groups layers by life cycle:
full-attention layers in one group, each sliding window in another, with page indices scoped
to a group. The reference executor imitates that on top of its one block allocator:

- ``LayerGroups.from_model(config)``: one group per window size (``None`` = full attention),
  ordered by their lowest layer id, so a model whose layer 0 slides has the sliding group first
  (Gemma-style); ``single(num_layers)``: one full-attention group (V1, or V2 without windows).
- Block ``b``'s page in group 0 is ``b``; in group 1 it is ``num_blocks - 1 - b`` (a fixed
  permutation, so page ids differ between groups as in V2 and a connector that mixes them up
  moves the wrong bytes).
- ``by_group(block_ids, first_ordinal, position, tokens_per_block)``: what V2's
  by-layer-group lists hold: per group the pages of ``block_ids`` (block ordinals from
  ``first_ordinal``), with ``-1`` (BAD_PAGE_INDEX) in a sliding group for every block no query
  from ``position`` on reads (all its tokens are ``<= position - window``). Those pages stay
  allocated here [U: V2 frees them]; the model never reads them.
- ``build_layout(pool)``: the ``KvCacheLayout`` ``register_kv_cache_layout`` receives: per
  group one region over its tensor (``[layers, K/V, heads*tokens*head_dim]`` per slot, buffers
  ``(layer, "key")``, ``(layer, "value")`` in memory order); ``gpu_pool_mapping_bytes`` is None
  (each group tensor is one allocation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvbm_trtllm.kv_cache_layout import (
    BAD_PAGE_INDEX,
    KvCacheBufferRef,
    KvCacheLayerGroupLayout,
    KvCacheLayout,
    KvCacheRegion,
)

if TYPE_CHECKING:
    from kvbm_trtllm.executor.pool import BlockPool

__all__ = ["LayerGroups", "build_layout"]


@dataclass(frozen=True)
class LayerGroups:
    layer_ids: tuple[tuple[int, ...], ...]
    windows: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if len(self.layer_ids) > 2:
            raise ValueError(
                f"the reference executor imitates at most two layer groups, got {len(self.layer_ids)}"
            )

    @classmethod
    def single(cls, num_layers: int) -> LayerGroups:
        return cls((tuple(range(num_layers)),), (None,))

    @classmethod
    def from_windows(cls, layer_windows: Sequence[int | None]) -> LayerGroups:
        """One group per distinct window, ordered by the group's lowest layer id."""
        groups: dict[int | None, list[int]] = {}
        for layer, window in enumerate(layer_windows):
            groups.setdefault(window, []).append(layer)
        ordered = sorted(groups.items(), key=lambda item: item[1][0])
        return cls(tuple(tuple(ids) for _, ids in ordered), tuple(w for w, _ in ordered))

    @property
    def num_groups(self) -> int:
        return len(self.layer_ids)

    @property
    def has_windows(self) -> bool:
        return any(w is not None for w in self.windows)

    def locate(self, layer_idx: int) -> tuple[int, int]:
        for group, layers in enumerate(self.layer_ids):
            if layer_idx in layers:
                return group, layers.index(layer_idx)
        raise KeyError(f"layer {layer_idx} is in no layer group")

    def window_of_layer(self, layer_idx: int) -> int | None:
        return self.windows[self.locate(layer_idx)[0]]

    @staticmethod
    def page(group: int, block_id: int, num_blocks: int) -> int:
        return block_id if group == 0 else num_blocks - 1 - block_id

    @staticmethod
    def pages(group: int, block_ids: torch.Tensor, num_blocks: int) -> torch.Tensor:
        return block_ids if group == 0 else (num_blocks - 1) - block_ids

    def is_live(self, group: int, ordinal: int, position: int, tokens_per_block: int) -> bool:
        """Whether a query at ``position`` or later reads block ``ordinal`` in ``group``."""
        window = self.windows[group]
        return window is None or (ordinal + 1) * tokens_per_block > position - window + 1

    def by_group(
        self,
        block_ids: Sequence[int],
        first_ordinal: int,
        position: int,
        tokens_per_block: int,
        num_blocks: int,
    ) -> list[list[int]]:
        return [
            [
                self.page(g, b, num_blocks)
                if self.is_live(g, first_ordinal + i, position, tokens_per_block)
                else BAD_PAGE_INDEX
                for i, b in enumerate(block_ids)
            ]
            for g in range(self.num_groups)
        ]


def _owner(tensor: torch.Tensor) -> dict[str, Any]:
    # The stand-in region keeps the tensor it describes (CPU memory has no address-only view);
    # TensorRT-LLM's own region views device memory from its address.
    return {"owner": tensor} if "owner" in getattr(KvCacheRegion, "__dataclass_fields__", {}) else {}


def build_layout(pool: BlockPool) -> Any:
    groups = []
    for group, (layers, tensor) in enumerate(
        zip(pool.groups.layer_ids, pool.group_tensors, strict=True)
    ):
        row_bytes = tensor[0].numel() * tensor.element_size()
        region = KvCacheRegion(
            base=tensor.data_ptr(),
            size=row_bytes,
            stride=row_bytes,
            num_slots=int(tensor.shape[0]),
            buffers=tuple(
                KvCacheBufferRef(layer_id=layer, role=role)
                for layer in layers
                for role in ("key", "value")
            ),
            **_owner(tensor),
        )
        groups.append(
            KvCacheLayerGroupLayout(
                layer_group_id=group,
                layer_ids=tuple(layers),
                window_size=pool.groups.windows[group],
                regions=(region,),
            )
        )
    return KvCacheLayout(tokens_per_block=pool.tokens_per_block, groups=tuple(groups))
