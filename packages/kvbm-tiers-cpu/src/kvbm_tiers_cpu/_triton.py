"""One Triton kernel that moves whole blocks, piece by piece, between the engine's pool and
a row-per-block buffer: a GPU staging buffer, or pinned host memory directly (zero-copy).

A block is ``num_pieces`` runs of ``piece_words`` int64 words; piece ``p`` of block ``b`` sits
at ``piece_ptrs[p] + b * row_words`` (one pointer per layer tensor, or per piece of one
strided view). Row ``i`` of the buffer is block ``block_ids[i]``'s pieces back to back,
at row index ``row_ids[i]``. One launch moves a whole batch, however many layers.

Zero-copy needs the GPU to address registered host memory by its host pointer
(``cudaDevAttrCanUseHostPointerForRegisteredMem``); ``can_address_host_memory`` asks the
driver through ``cuda.bindings`` and says no when it cannot ask.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

__all__ = ["is_available", "can_address_host_memory", "move_blocks", "warm_up"]

logger = logging.getLogger("kvbm.tiers.cpu")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch paths do the work
    triton = None


def is_available(device: torch.device) -> bool:
    return triton is not None and _move_pieces is not None and device.type == "cuda"


def _kernel() -> Any:
    if _move_pieces is None:
        raise RuntimeError("cpu tier: the Triton block kernel is unavailable (check is_available() first)")
    return _move_pieces


@functools.cache
def can_address_host_memory(device_index: int) -> bool:
    try:
        from cuda.bindings import runtime
    except ImportError:
        return False
    attribute = runtime.cudaDeviceAttr.cudaDevAttrCanUseHostPointerForRegisteredMem
    err, value = runtime.cudaDeviceGetAttribute(attribute, device_index)
    return int(err) == 0 and value == 1


def _define_kernel():
    # Offsets and addresses change from call to call: specializing on them would recompile.
    @triton.jit(do_not_specialize=["block_first", "row_first", "rows_base"])
    def _move_pieces(piece_ptrs, ids, block_first, row_first, rows_base, row_words, piece_words,
                     num_pieces, ROW_IS_INDEX: tl.constexpr, TO_POOL: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        piece = tl.program_id(1)
        block = tl.load(ids + block_first + i)
        if ROW_IS_INDEX:  # noqa: SIM108 - a constexpr branch, resolved at compile time
            row = i.to(tl.int64)
        else:
            row = tl.load(ids + row_first + i)
        pool = tl.load(piece_ptrs + piece).to(tl.pointer_type(tl.int64)) + block * row_words
        rows = (rows_base + (row * num_pieces + piece) * piece_words * 8).to(tl.pointer_type(tl.int64))
        for start in range(0, piece_words, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < piece_words
            if TO_POOL:
                tl.store(pool + offsets, tl.load(rows + offsets, mask=mask), mask=mask)
            else:
                tl.store(rows + offsets, tl.load(pool + offsets, mask=mask), mask=mask)

    return _move_pieces


_move_pieces: Any = None
if triton is not None:
    try:
        _move_pieces = _define_kernel()
    except Exception as exc:  # noqa: BLE001 - an incompatible Triton: the torch paths do the work
        logger.warning("cpu tier: Triton kernel unavailable (%s); using torch kernels", exc)


def _whole(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``ids`` as (a view from the start of its allocation, offset): keeps pointer alignment fixed."""
    offset = int(ids.storage_offset())
    return ids.as_strided((offset + ids.numel(),), (1,), 0), offset


def warm_up(piece_ptrs: torch.Tensor, row_words: int, piece_words: int, rows_base: int) -> None:
    """Compile every variant now, so the first transfer does not wait for the JIT."""
    ids = torch.zeros(2, dtype=torch.int64, device=piece_ptrs.device)
    block = min(1024, triton.next_power_of_2(piece_words))
    for row_is_index in (False, True):
        for to_pool in (False, True):
            _kernel().warmup(
                piece_ptrs, ids, 0, 1, rows_base, row_words, piece_words, piece_ptrs.numel(),
                ROW_IS_INDEX=row_is_index, TO_POOL=to_pool, BLOCK=block, grid=(1,),
            )


def move_blocks(
    piece_ptrs: torch.Tensor,
    row_words: int,
    piece_words: int,
    block_ids: torch.Tensor,
    row_ids: torch.Tensor | None,
    rows_base: int,
    to_pool: bool,
) -> None:
    """Pool blocks ``block_ids`` <-> buffer rows ``row_ids`` (``None``: rows 0..n-1), the
    buffer starting at address ``rows_base``. Both id tensors are int64 views of one allocation."""
    ids, block_first = _whole(block_ids)
    row_first = 0
    if row_ids is not None:
        row_whole, row_first = _whole(row_ids)
        if row_whole.data_ptr() != ids.data_ptr():
            raise ValueError("block_ids and row_ids must be views of one tensor")
        if row_whole.numel() > ids.numel():
            ids = row_whole
    grid = (block_ids.numel(), piece_ptrs.numel())
    block = min(1024, triton.next_power_of_2(piece_words))
    _kernel()[grid](
        piece_ptrs, ids, block_first, row_first, rows_base, row_words, piece_words, piece_ptrs.numel(),
        ROW_IS_INDEX=row_ids is None, TO_POOL=to_pool, BLOCK=block,
    )
