"""The executor's KV block pool: TensorRT-LLM's primary-pool layout, prefix reuse, LRU eviction.

Tensor: ``[num_blocks, num_layers, 2, num_kv_heads * tokens_per_block * head_dim]`` (one rank's
KV-head shard under TP; inside a region the order is heads, tokens, head_dim), the tensor the
connector's ``register_kv_caches`` receives.

With ``layer_groups`` (the V2 profile: KVCacheManagerV2's one page space per layer group,
``layer_groups.py``) each group has its own tensor ``[num_blocks, layers of the group, 2, ...]``
and block ``b``'s page in group ``g`` is ``groups.page(g, b)``; ``tensor`` is then group 0's.
``layer_view`` and ``layer_pages`` hide the difference from the model.

Bookkeeping (every rank runs the same, so block ids agree across ranks):
- ``match_prefix(hashes)``: the blocks already holding the longest cached prefix (full blocks,
  each named by the chained hash of its whole prefix, ``block_hash.py``). Partial reuse (a
  partly matching block copied, TensorRT-LLM's ``enable_partial_reuse=True`` default, which
  ``KvCacheConfigLike`` reports) is not implemented: only whole blocks are reused. With
  ``enable_block_reuse=False`` nothing matches, and the executor does not consult the
  connector either.
- ``allocate(num_blocks, reused)``: take the matched blocks (reference-counted) plus fresh ones;
  a fresh block comes from the free list in LRU order, and a free block that still caches a
  prefix loses its hash then (eviction). ``None`` when the pool cannot supply them.
- ``commit(block_id, block_hash)``: a block's KV is complete; make it matchable.
- ``release(block_ids)``: drop one reference per block; blocks reaching zero become free (still
  matchable until evicted), tail blocks first so shared prefixes are evicted last.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvbm_trtllm.executor.layer_groups import LayerGroups

__all__ = ["PoolConfig", "BlockPool"]


@dataclass(frozen=True)
class PoolConfig:
    num_blocks: int
    tokens_per_block: int = 32
    enable_block_reuse: bool = True

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.tokens_per_block <= 0:
            raise ValueError(
                f"PoolConfig needs positive num_blocks and tokens_per_block, got "
                f"{self.num_blocks} and {self.tokens_per_block}"
            )


class BlockPool:
    def __init__(
        self,
        config: PoolConfig,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        layer_groups: LayerGroups | None = None,
    ):
        self.config = config
        self.tokens_per_block = config.tokens_per_block
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.groups = layer_groups or LayerGroups.single(num_layers)
        region = num_kv_heads * config.tokens_per_block * head_dim
        self.group_tensors = [
            torch.zeros((config.num_blocks, len(layers), 2, region), dtype=dtype, device=device)
            for layers in self.groups.layer_ids
        ]
        self.tensor = self.group_tensors[0]
        self._ref_counts = [0] * config.num_blocks
        self._block_hashes: list[int | None] = [None] * config.num_blocks
        self._hash_to_block: dict[int, int] = {}
        # Free blocks, least recently freed first; uncached ones are moved to the front.
        self._free: OrderedDict[int, None] = OrderedDict(
            (i, None) for i in range(config.num_blocks)
        )
        self.num_evicted_blocks = 0

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    def layer_view(self, layer_idx: int, kv: int) -> torch.Tensor:
        """``[num_pages, heads, tokens, head_dim]`` view of one layer's K (0) or V (1)."""
        group, local = self.groups.locate(layer_idx)
        return self.group_tensors[group][:, local, kv].view(
            self.num_blocks, self.num_kv_heads, self.tokens_per_block, self.head_dim
        )

    def layer_pages(self, layer_idx: int, block_ids: torch.Tensor) -> torch.Tensor:
        """The pages of ``block_ids`` in the page space of ``layer_idx``'s group."""
        group, _ = self.groups.locate(layer_idx)
        return self.groups.pages(group, block_ids, self.num_blocks)

    def match_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        if not self.config.enable_block_reuse:
            return []
        matched: list[int] = []
        for block_hash in block_hashes:
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def num_allocatable(self, reused: Sequence[int]) -> int:
        """Fresh blocks available once ``reused`` (possibly free, cached) blocks are taken."""
        return len(self._free) - sum(1 for b in reused if b in self._free)

    def allocate(self, num_blocks: int, reused: Sequence[int] = ()) -> list[int] | None:
        num_fresh = num_blocks - len(reused)
        if num_fresh < 0:
            raise ValueError(f"{len(reused)} reused blocks exceed the {num_blocks} requested")
        if num_fresh > self.num_allocatable(reused):
            return None
        for block_id in reused:
            self._free.pop(block_id, None)
            self._ref_counts[block_id] += 1
        return list(reused) + [self._take_fresh() for _ in range(num_fresh)]

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        old_hash = self._block_hashes[block_id]
        if old_hash is not None:
            del self._hash_to_block[old_hash]
            self._block_hashes[block_id] = None
            self.num_evicted_blocks += 1
        self._ref_counts[block_id] = 1
        return block_id

    def commit(self, block_id: int, block_hash: int) -> None:
        if not self.config.enable_block_reuse or self._block_hashes[block_id] is not None:
            return
        # A prefix computed twice concurrently keeps its first copy; the duplicate stays private.
        if block_hash in self._hash_to_block:
            return
        self._block_hashes[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id

    def release(self, block_ids: Sequence[int]) -> None:
        for block_id in reversed(block_ids):
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} released more often than allocated")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self._block_hashes[block_id] is None:
                    self._free.move_to_end(block_id, last=False)
