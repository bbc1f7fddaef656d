"""Shared tiers (G4): what the leader learns about a store other engines write too.

Runs in the leader process. A tier whose :class:`~kvbm_core.plugins.TierSpec` has
``make_presence`` is shared: other engine instances put blocks into it and the store sizes and
evicts them itself. The leader's :class:`~kvbm_core.index.TierIndex` for such a tier is a
bounded *presence cache*, not an allocator: its ``num_slots`` is how many block hashes the
leader remembers, a "slot" only names a cache entry (the tier's workers key values by block
hash, never by slot), and evicting an entry forgets it without touching the store.

- ``PresenceSource.query(hashes)``: which of ``hashes`` the store holds now, answered within
  the source's own latency bound; it never raises (an unreachable store holds nothing).
- ``PresencePlanner._learn_presence(hashes)``: called by ``BlockManager.lookup`` before it
  matches: asks each shared tier about the hashes no tier's index holds and caches the present
  ones as readable. A block found missing when loaded fails its load as corrupt would
  (``JobResult.bad_block_hashes``), so it leaves the cache and the engine recomputes it.
- ``PresencePlanner._is_shared(name)``: evicting a presence entry publishes no
  ``BlockRemoved`` (the block is still in the store).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvbm_core.index import TierIndex
    from kvbm_core.metrics import KvbmStats
    from kvbm_core.plan import TierSlots

__all__ = ["PresenceSource", "PresencePlanner"]


class PresenceSource(Protocol):
    def query(self, block_hashes: Sequence[int]) -> set[int]:
        """Which blocks the shared store holds (every rank's shard of them).

        Args:
            block_hashes: blocks to ask about, in prefix order.

        Returns:
            The hashes present; empty when the store is unreachable or slower than the bound.
        """
        ...

    def close(self) -> None: ...


class PresencePlanner:
    """A base of :class:`~kvbm_core.manager.BlockManager`: presence of shared tiers."""

    tiers: list[TierSlots]
    indexes: dict[str, TierIndex]
    stats: KvbmStats

    def _is_shared(self, name: str) -> bool:
        return any(t.name == name and t.presence is not None for t in self.tiers)

    def _learn_presence(self, hashes: Sequence[int]) -> None:
        for tier in self.tiers:
            if tier.presence is None:
                continue
            unknown = [h for h in hashes if not any(h in i for i in self.indexes.values())]
            if not unknown:
                continue
            present = tier.presence.query(unknown)
            self.stats.add("shared_presence_queries")
            # Only a prefix can match: a block after the first one held nowhere is useless.
            seed = []
            for block_hash in unknown:
                if block_hash not in present:
                    break
                seed.append(block_hash)
            if not seed:
                continue
            index = self.indexes[tier.name]
            allocation = index.prepare_store(seed)
            if allocation is not None:
                index.complete_store(allocation.block_hashes, success=True)
                self.stats.add("shared_presence_hits", len(allocation.block_hashes))
