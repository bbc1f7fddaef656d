"""Host buffers the disk tier does I/O through.

O_DIRECT needs every buffer address and length aligned to the device's logical block; 4 KiB
(``ALIGN``) covers every device in practice. Operations (worker process, any thread):
- ``aligned_array(num_bytes)``: a page-aligned ``uint8`` numpy array (anonymous mmap).
- ``aligned_tensor(num_bytes, pin)``: a 4 KiB-aligned ``uint8`` CPU tensor, pinned when asked
  and CUDA is available (the bounce buffer between disk and GPU).
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from kvbm_tiers_disk.slot_format import ALIGN

__all__ = ["aligned_array", "aligned_tensor"]


def aligned_array(num_bytes: int) -> np.ndarray:
    # An anonymous mapping is page aligned and zero filled; numpy keeps it alive.
    return np.frombuffer(mmap.mmap(-1, max(num_bytes, 1)), dtype=np.uint8)[:num_bytes]


def aligned_tensor(num_bytes: int, pin: bool) -> Any:
    import torch

    pin = pin and torch.cuda.is_available()
    raw = torch.empty(num_bytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start : start + num_bytes]
