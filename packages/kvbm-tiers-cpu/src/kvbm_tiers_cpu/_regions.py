"""Gather/scatter of whole blocks between a ``RegionPool`` (KVCacheManagerV2) and buffer rows.

The counterpart of ``PoolAccess`` for an engine that hands page regions rather than one pool
tensor (``kvbm_core.regions``). A row is one block as the host tier stores it: every region's
``size`` bytes at its ``offset``. Per batch and region, one ``index_select`` (gather) or
``index_copy_`` (scatter) moves the pages of every block, so a batch costs one kernel per
region whatever its number of blocks. Pages of non-primary groups are looked up on the host
(``chunk_ids``) and travel with the block ids, as the block ids do, through pinned memory.

A load writes only the pages that exist: a block that left a sliding window has no page in
that group and the engine no longer reads that part. A store of a block lacking a page is
refused at submit (``find_error``): its tier copy would be incomplete.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvbm_core.regions import RegionPool
from kvbm_tiers_cpu._device import Lane, upload_ids

__all__ = ["RegionAccess", "RegionIds"]

_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass(frozen=True)
class RegionIds:
    """One chunk's pages per page space: ``pages[g]`` on the device, and where some blocks
    have no page in group ``g``, ``rows[g]``: which rows of the chunk the pages belong to."""

    pages: list[torch.Tensor]
    rows: list[torch.Tensor | None]


class RegionAccess:
    has_triton = False
    is_batched = True

    def __init__(self, pool: RegionPool) -> None:
        self.pool = pool
        self.num_blocks = pool.num_slots
        self.device = torch.device(pool.device)
        self.bytes_per_block = pool.layout.bytes_per_block
        self.word = _widest_word(pool, self.bytes_per_block)
        self.views = [region.rows.view(self.word) for region in pool.regions]
        self.spans = [
            (region.group, region.offset // self.word.itemsize, region.size // self.word.itemsize)
            for region in pool.regions
        ]

    def warm_up(self, rows_base: int) -> None:
        return None

    def to_host(self, block_ids: torch.Tensor, slot_ids: torch.Tensor, host_rows: torch.Tensor) -> None:
        raise RuntimeError("zero-copy moves need one pool tensor; page regions always stage")

    from_host = to_host

    def find_error(self, job_id: int, gpu_ids: np.ndarray, is_onboard: bool) -> str | None:
        """Why a store cannot run (a block with no page in some group), else ``None``."""
        if is_onboard:
            return None
        missing = self.pool.missing_page(gpu_ids)
        if missing is None:
            return None
        block_id, group = missing
        return (
            f"job {job_id}: block {block_id} has no page in layer group {group} (it left the "
            f"sliding window or was never allocated there); its copy would be incomplete"
        )

    def chunk_ids(self, block_ids: torch.Tensor, gpu_ids: np.ndarray, lane: Lane) -> RegionIds:
        pages: list[torch.Tensor] = [block_ids]
        rows: list[torch.Tensor | None] = [None]
        for group in range(1, self.pool.num_groups):
            group_pages = self.pool.pages_of(group, gpu_ids)
            present = np.flatnonzero(group_pages >= 0)
            if present.size == group_pages.size:
                pages.append(upload_ids(group_pages, lane))
                rows.append(None)
            else:
                pages.append(upload_ids(group_pages[present], lane))
                rows.append(upload_ids(present, lane))
        return RegionIds(pages, rows)

    def _words(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(self.word)

    def gather(self, ids: RegionIds, out_rows: torch.Tensor) -> None:
        """``out_rows[i]`` = block ``i`` of the chunk, every region at its offset."""
        out = self._words(out_rows)
        for view, (group, start, size) in zip(self.views, self.spans, strict=True):
            if ids.rows[group] is not None:
                raise ValueError(f"a store reached the GPU without a page in layer group {group}")
            out[:, start : start + size] = view.index_select(0, ids.pages[group])

    def scatter(self, ids: RegionIds, rows_in: torch.Tensor) -> None:
        src = self._words(rows_in)
        for view, (group, start, size) in zip(self.views, self.spans, strict=True):
            piece = src[:, start : start + size]
            rows = ids.rows[group]
            if rows is not None:
                piece = piece.index_select(0, rows)
            view.index_copy_(0, ids.pages[group], piece)


def _widest_word(pool: RegionPool, bytes_per_block: int) -> torch.dtype:
    numbers = [bytes_per_block]
    for region in pool.regions:
        rows = region.rows
        numbers += [region.offset, region.size, rows.stride(0) * rows.element_size(), rows.data_ptr()]
    for word in _WORDS:
        if all(n % word.itemsize == 0 for n in numbers):
            return word
    return torch.uint8
