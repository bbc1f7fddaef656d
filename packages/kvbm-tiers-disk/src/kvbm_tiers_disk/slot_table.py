"""What each slot of one rank's disk tier holds, in compact arrays instead of Python objects.

Runs in each worker process; callers hold their own lock (the persistent index's). 17 bytes
per slot (a uint64 block hash, a uint64 payload checksum and a presence flag) however many
blocks are stored, plus a set of the slots changed since the last flush. Operations:
- ``SlotTable(num_slots)``; ``apply_entries(entries)`` / ``apply_records(records)``: load a
  snapshot's entries or replay journal records (vectorised; records past ``num_slots`` are
  dropped and counted in the return value).
- ``store(slot, block_hash, checksum)`` / ``remove(slot)`` / ``clear()``.
- ``take_changes()``: the records (:data:`~kvbm_tiers_disk.journal.RECORD_DTYPE`) stating the
  slots changed since the last call; ``entries()``: every stored slot (a snapshot's entries).
- ``block_map()``: a :class:`BlockMap` of what is stored.

``BlockMap`` is the read-only ``Mapping[int, int]`` (block hash -> slot) that
``persisted_blocks()`` returns: two sorted arrays (12 bytes per block), lookups by binary
search, ``items()`` without a Python object per block until iterated.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping

import numpy as np

from kvbm_tiers_disk.index_file import ENTRY_DTYPE
from kvbm_tiers_disk.journal import REMOVED

__all__ = ["SlotTable", "BlockMap"]


class BlockMap(Mapping[int, int]):
    """Block hash -> slot, backed by ``hashes`` (sorted uint64) and ``slot_ids`` (int32)."""

    def __init__(self, hashes: np.ndarray, slot_ids: np.ndarray) -> None:
        self.hashes = hashes
        self.slot_ids = slot_ids

    @classmethod
    def from_slots(cls, slot_ids: np.ndarray, hashes: np.ndarray) -> BlockMap:
        """The map of ``slot_ids`` (ascending) holding ``hashes``; a hash stored twice maps to
        its highest slot."""
        order = np.argsort(hashes, kind="stable")  # equal hashes keep their slot order
        sorted_hashes, sorted_slots = hashes[order], slot_ids[order]
        is_last = np.ones(len(order), bool)
        is_last[:-1] = sorted_hashes[1:] != sorted_hashes[:-1]
        return cls(sorted_hashes[is_last], sorted_slots[is_last].astype(np.int32))

    def __len__(self) -> int:
        return len(self.hashes)

    def __getitem__(self, block_hash: object) -> int:
        if not isinstance(block_hash, int | np.integer) or not 0 <= block_hash < 1 << 64:
            raise KeyError(block_hash)
        at = int(np.searchsorted(self.hashes, np.uint64(block_hash)))
        if at == len(self.hashes) or self.hashes[at] != block_hash:
            raise KeyError(block_hash)
        return int(self.slot_ids[at])

    def __iter__(self) -> Iterator[int]:
        return iter(self.hashes.tolist())

    def items(self) -> ItemsView[int, int]:
        return _Items(self)

    @property
    def nbytes(self) -> int:
        return self.hashes.nbytes + self.slot_ids.nbytes

    def __repr__(self) -> str:
        return f"BlockMap({len(self)} blocks)"


class _Items(ItemsView[int, int]):
    _mapping: BlockMap

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._mapping.hashes.tolist(), self._mapping.slot_ids.tolist(), strict=True)


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.is_stored = np.zeros(num_slots, bool)
        self.hashes = np.zeros(num_slots, np.uint64)
        self.checksums = np.zeros(num_slots, np.uint64)
        self.num_stored = 0
        self._changed: set[int] = set()

    @property
    def nbytes(self) -> int:
        return self.is_stored.nbytes + self.hashes.nbytes + self.checksums.nbytes

    @property
    def num_changed(self) -> int:
        return len(self._changed)

    def apply_entries(self, entries: np.ndarray) -> int:
        """Store a snapshot's entries; the number dropped for lying past ``num_slots``."""
        in_range = entries["slot"] < self.num_slots
        kept = entries if in_range.all() else entries[in_range]  # no copy in the usual case
        slot_ids = kept["slot"].astype(np.intp)
        self.is_stored[slot_ids] = True
        self.hashes[slot_ids] = kept["block_hash"]
        self.checksums[slot_ids] = kept["checksum"]
        self.num_stored = int(np.count_nonzero(self.is_stored))
        return len(entries) - len(kept)

    def apply_records(self, records: np.ndarray) -> int:
        """Replay journal records in order (the last one of a slot wins); the number of
        stored slots dropped for lying past ``num_slots``."""
        if not len(records):
            return 0
        latest = records[::-1]
        slot_ids = latest["slot"] & np.uint64(REMOVED - 1)
        _, first = np.unique(slot_ids, return_index=True)
        latest, slot_ids = latest[first], slot_ids[first]
        is_removed = (latest["slot"] & np.uint64(REMOVED)) != 0
        in_range = slot_ids < self.num_slots
        gone = slot_ids[is_removed & in_range].astype(np.intp)
        self.is_stored[gone] = False
        self.num_stored = int(np.count_nonzero(self.is_stored))
        stored = ~is_removed & in_range
        self.apply_entries(
            _entries(slot_ids[stored], latest["block_hash"][stored], latest["checksum"][stored])
        )
        return int(np.count_nonzero(~is_removed & ~in_range))

    def store(self, slot: int, block_hash: int, checksum: int) -> None:
        if not self.is_stored[slot]:
            self.num_stored += 1
        self.is_stored[slot] = True
        self.hashes[slot] = block_hash
        self.checksums[slot] = checksum
        self._changed.add(slot)

    def remove(self, slot: int) -> bool:
        """Mark ``slot`` empty; whether it held a block."""
        if not self.is_stored[slot]:
            return False
        self.is_stored[slot] = False
        self.num_stored -= 1
        self._changed.add(slot)
        return True

    def clear(self) -> None:
        self._changed.update(np.flatnonzero(self.is_stored).tolist())
        self.is_stored[:] = False
        self.num_stored = 0

    def take_changes(self) -> np.ndarray:
        """Records stating every slot changed since the last call (cleared)."""
        slot_ids = np.fromiter(self._changed, np.int64, len(self._changed))
        self._changed.clear()
        slot_ids.sort()
        records = _entries(slot_ids, self.hashes[slot_ids], self.checksums[slot_ids])
        records["slot"][~self.is_stored[slot_ids]] |= np.uint64(REMOVED)
        return records

    def forget_changes(self) -> None:
        """Drop the record of changes (a snapshot written from ``entries()`` holds them)."""
        self._changed.clear()

    def restore_changes(self, records: np.ndarray) -> None:
        """Mark the slots of ``records`` (from ``take_changes``) changed again: a failed
        append is retried at the next flush, with the slots' state by then."""
        self._changed.update((records["slot"] & np.uint64(REMOVED - 1)).tolist())

    def entries(self) -> np.ndarray:
        slot_ids = np.flatnonzero(self.is_stored)
        return _entries(slot_ids, self.hashes[slot_ids], self.checksums[slot_ids])

    def block_map(self) -> BlockMap:
        slot_ids = np.flatnonzero(self.is_stored)
        return BlockMap.from_slots(slot_ids, self.hashes[slot_ids])


def _entries(slot_ids: np.ndarray, hashes: np.ndarray, checksums: np.ndarray) -> np.ndarray:
    table = np.empty(len(slot_ids), ENTRY_DTYPE)
    table["slot"] = slot_ids
    table["block_hash"] = hashes
    table["checksum"] = checksums
    return table
