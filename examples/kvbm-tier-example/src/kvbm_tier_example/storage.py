"""One rank's ``mmap`` storage: ``num_slots`` blocks in an unlinked memory-mapped file.

The file lives in ``ctx.options["mmap_dir"]`` (default: the system temporary directory) and is
unlinked as soon as it is mapped, so a crashed worker leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import numpy as np

from kvbm_core import KvLayout, Storage, TierContext


class MmapStorage(Storage):
    medium = "mmap"

    def __init__(self, blocks: np.memmap, layout: KvLayout) -> None:
        self.layout = layout
        self.num_slots = int(blocks.shape[0])
        self._blocks: np.memmap | None = blocks

    @classmethod
    def create(cls, ctx: TierContext) -> MmapStorage:
        directory = Path(ctx.options.get("mmap_dir") or tempfile.gettempdir())
        if not directory.is_dir():
            raise ValueError(
                f"mmap tier: mmap_dir {str(directory)!r} is not a directory; create it or point "
                "the tier option mmap_dir at an existing one"
            )
        path = directory / f"kvbm-mmap-rank{ctx.rank}-{uuid.uuid4().hex}.kv"
        shape = (ctx.num_slots, ctx.layout.bytes_per_block)
        blocks = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
        os.unlink(path)
        return cls(blocks, ctx.layout)

    def host_view(self) -> np.ndarray | None:
        return self._blocks

    def close(self) -> None:
        if self._blocks is not None:
            self._blocks._mmap.close()  # type: ignore[attr-defined]
            self._blocks = None
