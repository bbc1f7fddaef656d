"""Host buffers the disk tier does I/O through.

O_DIRECT needs every buffer address and length aligned to the device's logical block; 4 KiB
(``ALIGN``) covers every device in practice. Operations (worker process, any thread):
- ``aligned_array(num_bytes)``: a page-aligned ``uint8`` numpy array (anonymous mmap).
- ``aligned_tensor(num_bytes, pin)``: a 4 KiB-aligned ``uint8`` CPU tensor, pinned when asked
  and CUDA is available (the bounce buffer between disk and GPU).
- ``as_buffer(array)``: an array typed as a ``Buffer``, for ``os.preadv``/``pwritev`` and xxhash.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from kvbm_tiers_disk.slot_format import ALIGN

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["aligned_array", "aligned_tensor", "as_buffer"]


def aligned_array(num_bytes: int) -> np.ndarray:
    # An anonymous mapping is page aligned and zero filled; numpy keeps it alive.
    return np.frombuffer(mmap.mmap(-1, max(num_bytes, 1)), dtype=np.uint8)[:num_bytes]


def aligned_tensor(num_bytes: int, pin: bool) -> Any:
    import torch

    pin = pin and torch.cuda.is_available()
    raw = torch.empty(num_bytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start : start + num_bytes]


def as_buffer(array: np.ndarray) -> Buffer:
    # Every ndarray exports the buffer protocol, but numpy's stubs declare
    # ``ndarray.__buffer__`` only for Python 3.12+, so for 3.11 mypy needs telling.
    return cast("Buffer", array)
