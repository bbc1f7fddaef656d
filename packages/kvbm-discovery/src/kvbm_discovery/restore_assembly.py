"""The leader's side of a chunked restore: collect every rank's
:class:`~kvbm_discovery.restore_chunks.StoredBlocksChunk` parts of a persistent tier, and
hand over the blocks every rank holds in the same slot once all parts of all ranks arrived.

Runs in the leader process, on whichever thread drains its inbox (callers hold its lock).

Operations:
- ``add(chunk, num_slots) -> bool``: keep one part (a repeat is harmless: it is acknowledged
  again and kept once). ``False``: the part is refused (it claims more blocks than the tier
  has slots); that rank's restore is dropped and counted as failed.
- ``take_complete(tier)``: ``{hash: slot}`` held by every rank, once every rank's parts are
  all in; ``None`` before. Afterwards the tier's state is gone.
- ``take_expired()``: restores not complete within ``timeout_secs`` of their first part, as
  :class:`RestoreFailure` (what is missing), dropped from memory: bounded waiting, visible
  failure.

Memory: a rank's parts are kept packed (12 bytes per block) and at most ``num_slots`` blocks
per rank; a new ``restore_id`` from a rank (the worker started again) replaces its old parts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kvbm_discovery.restore_chunks import StoredBlocksChunk

__all__ = ["RestoreAssembly", "RestoreFailure", "DEFAULT_RESTORE_TIMEOUT_SECS"]

DEFAULT_RESTORE_TIMEOUT_SECS = 300.0


@dataclass(frozen=True)
class RestoreFailure:
    tier: str
    missing: str  # e.g. "rank 1: 3 of 40 chunks; rank 2: nothing"


@dataclass
class _RankParts:
    restore_id: str
    num_chunks: int
    parts: dict[int, StoredBlocksChunk] = field(default_factory=dict)
    num_blocks: int = 0

    @property
    def is_complete(self) -> bool:
        return len(self.parts) == self.num_chunks

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's hashes (unique, sorted) and their slots; a repeated hash keeps its first slot."""
        ordered = [self.parts[i] for i in range(self.num_chunks)]
        hashes = np.concatenate([p.hash_array() for p in ordered])
        slots = np.concatenate([p.slot_array() for p in ordered])
        hashes, first = np.unique(hashes, return_index=True)
        return hashes, slots[first]


@dataclass
class _TierRestore:
    started_at: float
    ranks: dict[int, _RankParts] = field(default_factory=dict)


class RestoreAssembly:
    def __init__(self, world_size: int, timeout_secs: float = DEFAULT_RESTORE_TIMEOUT_SECS) -> None:
        self.world_size = world_size
        self.timeout_secs = timeout_secs
        self._tiers: dict[str, _TierRestore] = {}

    def add(self, chunk: StoredBlocksChunk, num_slots: int) -> bool:
        restore = self._tiers.setdefault(chunk.tier, _TierRestore(time.monotonic()))
        held = restore.ranks.get(chunk.rank)
        if held is None or held.restore_id != chunk.restore_id or held.num_chunks != chunk.num_chunks:
            held = restore.ranks[chunk.rank] = _RankParts(chunk.restore_id, chunk.num_chunks)
        if chunk.chunk_index in held.parts:
            return True
        if held.num_blocks + chunk.num_blocks > num_slots:
            del restore.ranks[chunk.rank]
            return False
        held.parts[chunk.chunk_index] = chunk
        held.num_blocks += chunk.num_blocks
        return True

    def take_complete(self, tier: str) -> dict[int, int] | None:
        restore = self._tiers.get(tier)
        if restore is None or len(restore.ranks) < self.world_size:
            return None
        if not all(parts.is_complete for parts in restore.ranks.values()):
            return None
        del self._tiers[tier]
        return _held_by_all([restore.ranks[r] for r in sorted(restore.ranks)])

    def take_expired(self) -> list[RestoreFailure]:
        now = time.monotonic()
        late = [t for t, r in self._tiers.items() if now - r.started_at > self.timeout_secs]
        return [RestoreFailure(tier, self._describe_missing(self._tiers.pop(tier))) for tier in late]

    def _describe_missing(self, restore: _TierRestore) -> str:
        missing = []
        for rank in range(self.world_size):
            parts = restore.ranks.get(rank)
            if parts is None:
                missing.append(f"rank {rank}: nothing")
            elif not parts.is_complete:
                missing.append(f"rank {rank}: {len(parts.parts)} of {parts.num_chunks} chunks")
        return "; ".join(missing)

    @property
    def num_pending(self) -> int:
        return len(self._tiers)


def _held_by_all(ranks: list[_RankParts]) -> dict[int, int]:
    """Blocks every rank holds, in the same slot on every rank."""
    hashes, slots = ranks[0].arrays()
    for parts in ranks[1:]:
        other_hashes, other_slots = parts.arrays()
        _, mine, theirs = np.intersect1d(hashes, other_hashes, assume_unique=True, return_indices=True)
        same = slots[mine] == other_slots[theirs]
        hashes, slots = hashes[mine[same]], slots[mine[same]]
    return dict(zip(hashes.tolist(), slots.tolist(), strict=True))
