"""A GPU pool made of page regions in several page spaces (TensorRT-LLM's KVCacheManagerV2).

Runs in each worker process. Under KVCacheManagerV2 the engine hands no single pool tensor:
each *layer group* has its own page slots (one index space per group) and a slot's bytes are
one or more *regions* (``base + stride * slot`` for ``size`` bytes). kvbm still moves whole
token blocks: block ``b`` of a request is the bytes of its page in every group, laid out in a
tier slot region after region (``PageRegion.offset``).

Contracts:
- Block ids are the pages of the *primary* group (page space 0, a full-attention group, which
  has a page for every block); the leader plans with them as with a V1 pool.
- ``set_pages(block_ids, pages)``: the page each block has in every other group, as the engine
  reported it; a negative entry (TensorRT-LLM's ``-1``) means the block has no page there (it
  left a sliding window, or was never allocated there); ``None`` keeps what is recorded (a
  block shared with another request that still has the page).
- ``pages_of(group, block_ids)``: those pages as an int64 array, ``-1`` where there is none.
  A store needs every page (a block missing one is refused: its copy would be incomplete); a
  load writes only the pages that exist (the engine no longer reads the others).

No torch at import time: ``PageRegion.rows`` is whatever the tier handlers index (a torch
``[num_pages, size]`` uint8 view).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbm_core.layout import KvLayout
from kvbm_core.transfer import GPU, Storage

__all__ = ["PageRegion", "RegionPool", "block_layout"]


@dataclass(frozen=True)
class PageRegion:
    """One region of one page space: ``rows[page]`` is ``size`` bytes at ``offset`` of a slot."""

    group: int
    offset: int
    size: int
    rows: Any


def block_layout(tokens_per_block: int, bytes_per_block: int) -> KvLayout:
    """A ``KvLayout`` that says only how many bytes one block is (tiers store it opaquely)."""
    if bytes_per_block <= 0 or bytes_per_block % tokens_per_block:
        raise ValueError(
            f"a block of {bytes_per_block} bytes is not a whole number of bytes for each of its "
            f"{tokens_per_block} tokens; kvbm needs per-token sizes that divide evenly"
        )
    return KvLayout(
        num_layers=1,
        tokens_per_block=tokens_per_block,
        num_kv_heads=1,
        head_dim=bytes_per_block // tokens_per_block,
        dtype="uint8",
        kv_factor=1,
    )


class RegionPool(Storage):
    """The engine's GPU pages, as page regions over ``num_groups`` page spaces (module doc)."""

    medium = GPU

    def __init__(
        self,
        regions: Sequence[PageRegion],
        layout: KvLayout,
        num_pages: Sequence[int],
        device: Any = "cpu",
    ) -> None:
        if not regions:
            raise ValueError("a RegionPool needs at least one region")
        end = 0
        for region in sorted(regions, key=lambda r: r.offset):
            if region.offset != end:
                raise ValueError(
                    f"regions must tile a block without gaps or overlaps: one starts at byte "
                    f"{region.offset}, expected {end}"
                )
            if not 0 <= region.group < len(num_pages):
                raise ValueError(f"region of page space {region.group}: only {len(num_pages)} exist")
            end += region.size
        if end != layout.bytes_per_block:
            raise ValueError(
                f"regions cover {end} bytes of a block but the layout says {layout.bytes_per_block}"
            )
        self.regions = list(regions)
        self.layout = layout
        self.num_pages = list(num_pages)
        self.num_slots = self.num_pages[0]
        self.device = device
        self._tables = [np.full(self.num_slots, -1, dtype=np.int64) for _ in self.num_pages[1:]]

    @property
    def num_groups(self) -> int:
        return len(self.num_pages)

    def set_pages(self, block_ids: Sequence[int], pages: Sequence[Sequence[int | None]]) -> None:
        """Record, for ``block_ids[i]``, its page ``pages[g - 1][i]`` in every group ``g > 0``.

        Args:
            block_ids: primary-group pages (the block ids the leader plans with).
            pages: one list per non-primary group, aligned with ``block_ids``; a negative
                entry: no page there; ``None``: keep the recorded page.

        Returns:
            Nothing; raises ``ValueError`` for a page outside its group.
        """
        if len(pages) != self.num_groups - 1:
            raise ValueError(f"pages for {len(pages)} groups; this pool has {self.num_groups - 1}")
        ids = np.asarray(block_ids, dtype=np.int64)
        for group, (table, group_pages) in enumerate(zip(self._tables, pages, strict=True), 1):
            if len(group_pages) != ids.size:
                raise ValueError(f"{len(group_pages)} pages of group {group} for {ids.size} blocks")
            known = np.asarray([p is not None for p in group_pages], dtype=bool)
            values = np.asarray([max(-1, p) for p in group_pages if p is not None], dtype=np.int64)
            bad = values[values >= self.num_pages[group]]
            if bad.size:
                raise ValueError(
                    f"page {int(bad[0])} of layer group {group} is out of range "
                    f"0..{self.num_pages[group] - 1}"
                )
            table[ids[known]] = values

    def pages_of(self, group: int, block_ids: np.ndarray) -> np.ndarray:
        if group == 0:
            return np.asarray(block_ids, dtype=np.int64)
        return self._tables[group - 1][np.asarray(block_ids, dtype=np.int64)]

    def missing_page(self, block_ids: np.ndarray) -> tuple[int, int] | None:
        """``(block id, group)`` of the first block lacking a page in some group, or ``None``."""
        for group in range(1, self.num_groups):
            pages = self.pages_of(group, block_ids)
            missing = np.flatnonzero(pages < 0)
            if missing.size:
                return int(block_ids[missing[0]]), group
        return None
