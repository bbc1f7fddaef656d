"""Where a handler's blocks live on the worker: the GPU pool or the host tier's rows.

``gather(ids, out, ready)`` copies blocks ``ids`` into ``out`` (``[n, bytes_per_block]`` uint8 on
the host), layer after layer whatever the pool's layout; ``scatter(ids, src)`` writes them back.
On a GPU both run on the handler's own stream; a gather waits for ``ready`` (a CUDA event
recorded after the forward pass) first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvbm_core.transfer import DevicePool

__all__ = ["PoolBlocks", "HostBlocks"]


class PoolBlocks:
    def __init__(self, pool: DevicePool) -> None:
        self.num_slots = pool.num_slots
        self._pieces = [t.view(torch.uint8).reshape(t.shape[0], -1) for t in pool.tensors]
        self._device = self._pieces[0].device
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None

    @property
    def is_cuda(self) -> bool:
        return self._stream is not None

    def gather(self, ids: Sequence[int], out: torch.Tensor, ready: Any = None) -> None:
        index = torch.as_tensor(ids, dtype=torch.long, device=self._device)
        if self._stream is None:
            _copy_columns(out, [piece[index] for piece in self._pieces])
            return
        with torch.cuda.stream(self._stream):
            if ready is not None:
                self._stream.wait_event(ready)
            _copy_columns(out, [piece[index] for piece in self._pieces])
        self._stream.synchronize()

    def scatter(self, ids: Sequence[int], src: torch.Tensor) -> None:
        index = torch.as_tensor(ids, dtype=torch.long, device=self._device)
        if self._stream is None:
            self._scatter(index, src)
            return
        with torch.cuda.stream(self._stream):
            self._scatter(index, src.to(self._device, non_blocking=True))
        self._stream.synchronize()

    def _scatter(self, index: torch.Tensor, src: torch.Tensor) -> None:
        offset = 0
        for piece in self._pieces:
            width = piece.shape[1]
            piece[index] = src[:, offset : offset + width]
            offset += width


def _copy_columns(out: torch.Tensor, parts: list[torch.Tensor]) -> None:
    offset = 0
    for part in parts:
        width = part.shape[1]
        out[:, offset : offset + width].copy_(part, non_blocking=False)
        offset += width


class HostBlocks:
    """The cpu tier's rows (``Storage.host_view()``) as a source of stores."""

    def __init__(self, rows: np.ndarray) -> None:
        self.num_slots = int(rows.shape[0])
        self._rows = rows

    def gather(self, ids: Sequence[int], out: torch.Tensor, ready: Any = None) -> None:
        np.take(self._rows, list(ids), axis=0, out=out.numpy())

    def scatter(self, ids: Sequence[int], src: torch.Tensor) -> None:
        self._rows[list(ids)] = src.numpy()
