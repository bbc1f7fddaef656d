"""Batched gather/scatter of whole blocks between the engine's pool and rows of a buffer.

A row is one block as the host tier stores it: its ``num_pieces`` runs back to back (one run
for a fully contiguous pool, one per layer for a layer-separate one). One kernel moves a whole
batch: where every piece of every block lies in one allocation at fixed strides (a
``[blocks, layers, kv, ...]`` pool, or layer tensors carved from one buffer) a strided view
and ``index_select``/``index_copy_`` do it; otherwise a Triton kernel over a table of layer
pointers (on CUDA), else one torch kernel per layer (CPU). Elements move as the widest integer
the byte offsets allow, so a kernel moves 8 bytes per element rather than 1.

The Triton kernel also moves blocks straight between the pool and pinned host memory
(``to_host``/``from_host``, zero-copy): used for batches whose host slots are scattered.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kvbm_core.layout import LayoutKind
from kvbm_core.transfer import DevicePool
from kvbm_tiers_cpu import _triton

__all__ = ["PoolAccess"]

logger = logging.getLogger("kvbm.tiers.cpu")

_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


class PoolAccess:
    def __init__(self, pool: DevicePool) -> None:
        layout = pool.layout
        expected = 1 if layout.kind is LayoutKind.FULLY_CONTIGUOUS else layout.num_layers
        if len(pool.tensors) != expected:
            raise ValueError(
                f"a {layout.kind.value} pool needs {expected} tensor(s), got {len(pool.tensors)}"
            )
        self.num_blocks = int(pool.tensors[0].shape[0])
        self.device = pool.tensors[0].device
        self.num_pieces = layout.num_pieces
        self.piece_bytes = layout.bytes_per_block // self.num_pieces
        rows = [_byte_rows(t, self.piece_bytes, self.num_blocks, i) for i, t in enumerate(pool.tensors)]
        stacked = _stack(rows)
        self.word = _widest_word(rows, stacked, self.piece_bytes)
        self.words_per_piece = self.piece_bytes // self.word.itemsize
        self.blocks = None if stacked is None else stacked.view(self.word)
        self.layers = [r.view(self.word) for r in rows]
        self.piece_ptrs, self.row_words = _piece_table(rows, self.word, self.device)

    def warm_up(self, rows_base: int) -> None:
        """Compile the Triton kernel for this pool (a JIT compile takes about a second)."""
        if self.piece_ptrs is None:
            return
        try:
            _triton.warm_up(self.piece_ptrs, self.row_words, self.words_per_piece, rows_base)
        except Exception as exc:  # noqa: BLE001 - the first launch compiles instead
            logger.warning("cpu tier: Triton kernel warm-up failed (%s); compiling on first use", exc)

    def find_error(self, job_id: int, gpu_ids: np.ndarray, is_onboard: bool) -> str | None:
        """Every block of a pool tensor has all its pieces: nothing to refuse here."""
        return None

    def chunk_ids(self, block_ids: torch.Tensor, gpu_ids: np.ndarray, lane: object) -> torch.Tensor:
        """The ids the kernels index with: the block ids themselves (see ``RegionAccess``)."""
        return block_ids

    @property
    def has_triton(self) -> bool:
        return self.piece_ptrs is not None

    @property
    def is_batched(self) -> bool:
        """One kernel per batch (rather than one per layer)."""
        return self.blocks is not None or self.has_triton

    def _move(self, block_ids: torch.Tensor, row_ids: torch.Tensor | None, rows_base: int, to_pool: bool) -> None:
        if self.piece_ptrs is None:
            raise RuntimeError("zero-copy block moves need the Triton kernel (CUDA, Triton, 8-byte aligned blocks)")
        _triton.move_blocks(
            self.piece_ptrs, self.row_words, self.words_per_piece, block_ids, row_ids, rows_base, to_pool
        )

    def to_host(self, block_ids: torch.Tensor, slot_ids: torch.Tensor, host_rows: torch.Tensor) -> None:
        """Zero-copy: block ``block_ids[i]`` into host slot ``slot_ids[i]`` (needs ``has_triton``)."""
        self._move(block_ids, slot_ids, host_rows.data_ptr(), to_pool=False)

    def from_host(self, block_ids: torch.Tensor, slot_ids: torch.Tensor, host_rows: torch.Tensor) -> None:
        self._move(block_ids, slot_ids, host_rows.data_ptr(), to_pool=True)

    def _pieces(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(self.word).view(rows.shape[0], self.num_pieces, self.words_per_piece)

    def gather(self, block_ids: torch.Tensor, out_rows: torch.Tensor) -> None:
        """``out_rows[i] = block block_ids[i]`` (``out_rows``: ``[n, bytes_per_block]`` uint8)."""
        out = self._pieces(out_rows)
        if self.blocks is not None:
            torch.index_select(self.blocks, 0, block_ids, out=out)
        elif self.has_triton:
            self._move(block_ids, None, out_rows.data_ptr(), to_pool=False)
        else:
            self._per_layer_gather(block_ids, out)

    def _per_layer_gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        for layer, rows in enumerate(self.layers):
            torch.index_select(rows, 0, block_ids, out=out[:, layer])

    def scatter(self, block_ids: torch.Tensor, rows_in: torch.Tensor) -> None:
        """Block ``block_ids[i] = rows_in[i]``."""
        src = self._pieces(rows_in)
        if self.blocks is not None:
            self.blocks.index_copy_(0, block_ids, src)
        elif self.has_triton:
            self._move(block_ids, None, rows_in.data_ptr(), to_pool=True)
        else:
            self._per_layer_scatter(block_ids, src)

    def _per_layer_scatter(self, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        for layer, rows in enumerate(self.layers):
            rows.index_copy_(0, block_ids, src[:, layer])


def _byte_rows(t: torch.Tensor, piece_bytes: int, num_blocks: int, index: int) -> torch.Tensor:
    """``[num_blocks, piece_bytes]`` uint8 view of a pool tensor whose block rows are contiguous."""
    if t.dim() < 2 or int(t.shape[0]) != num_blocks:
        raise ValueError(
            f"pool tensor {index} has shape {list(t.shape)}; expected [{num_blocks}, ...] "
            f"(blocks first, as every tensor of the pool)"
        )
    row_bytes = t[0].numel() * t.element_size()
    if row_bytes != piece_bytes:
        raise ValueError(
            f"pool tensor {index} holds {row_bytes} bytes per block, but the layout says "
            f"{piece_bytes}; the KvLayout does not describe this pool"
        )
    if not t[0].is_contiguous():
        raise ValueError(
            f"pool tensor {index} (strides {t.stride()}) does not keep each block's bytes "
            f"contiguous; pass a tensor whose dims after the first are contiguous"
        )
    u8 = t if t.dtype == torch.uint8 else t.view(torch.uint8)
    return u8.as_strided((num_blocks, piece_bytes), (u8.stride(0), 1))


def _stack(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """``[blocks, pieces, piece_bytes]`` over all pieces when they sit at fixed strides."""
    first = rows[0]
    if len(rows) == 1:
        return first.unsqueeze(1)
    base = first.untyped_storage().data_ptr()
    offsets = [r.storage_offset() for r in rows]
    spacing = offsets[1] - offsets[0]
    if spacing <= 0:
        return None
    for i, r in enumerate(rows):
        if r.untyped_storage().data_ptr() != base or r.stride() != first.stride():
            return None
        if offsets[i] != offsets[0] + i * spacing:
            return None
    shape = (first.shape[0], len(rows), first.shape[1])
    return first.as_strided(shape, (first.stride(0), spacing, 1))


def _widest_word(rows: list[torch.Tensor], stacked: torch.Tensor | None, piece_bytes: int) -> torch.dtype:
    numbers = [piece_bytes, *(r.stride(0) for r in rows), *(r.storage_offset() for r in rows)]
    numbers += [r.untyped_storage().data_ptr() for r in rows]
    if stacked is not None:
        numbers += list(stacked.stride()[:-1])
    for word in _WORDS:
        if all(n % word.itemsize == 0 for n in numbers):
            return word
    return torch.uint8


def _piece_table(rows: list[torch.Tensor], word: torch.dtype, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """Device table of piece addresses for the Triton kernel, when it can run on this pool."""
    stride = rows[0].stride(0)
    if word != torch.int64 or not _triton.is_available(device):
        return None, 0
    if any(r.stride(0) != stride for r in rows):
        return None, 0
    ptrs = np.array([r.data_ptr() for r in rows], dtype=np.int64)
    return torch.from_numpy(ptrs).to(device), stride // 8
