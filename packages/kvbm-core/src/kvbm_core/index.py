"""A tier's index on the leader: which block hash lives in which slot, and what may be evicted.

Runs in the leader process only; it holds no KV bytes. One ``TierIndex`` per tier.

Operations:
- ``match_prefix(hashes)``: how many leading hashes are readable here.
- ``slot_of(hash)``: the slot of a readable block, or ``None``.
- ``pin(hashes, allow_pending=False)`` / ``unpin(slots)``: a read in flight holds its blocks;
  pinned blocks are never evicted and their slots never rewritten. Pins count, so several
  readers may share a block. ``allow_pending`` pins blocks still being written, for a copy
  chained behind their store; if that store fails, the slot is freed at the last unpin.
- ``prepare_store(hashes, priorities)``: allocate slots for the hashes not held yet, evicting
  readable unpinned blocks by (lowest priority, least recently released). New blocks are
  *pending*: neither matchable nor evictable until ``complete_store``. Returns ``None`` when
  nothing could be allocated.
- ``complete_store(hashes, success)``: a pending block becomes readable once every rank wrote
  it, or is rolled back (slot freed) when any rank failed. A slot whose writes failed
  ``MAX_SLOT_FAILURES`` times is retired: the tier degrades to fewer slots rather than keep
  failing on a bad region.
- ``remove(hashes)``: forget blocks (e.g. found corrupt); a pinned one stops matching at once
  and its slot is freed when its last reader unpins.
- ``restore(blocks)``: seed readable blocks (a persistent tier after a restart).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["TierIndex", "StoreAllocation", "MAX_SLOT_FAILURES"]

MAX_SLOT_FAILURES = 3


@dataclass(slots=True)
class _Entry:
    block_hash: int
    slot: int
    is_ready: bool = False
    num_pins: int = 0
    priority: int = 0
    released_at: int = 0
    is_removed: bool = False


@dataclass(frozen=True, slots=True)
class StoreAllocation:
    """Result of ``prepare_store``: slots for the hashes that were not held yet."""

    block_hashes: tuple[int, ...]
    slots: tuple[int, ...]
    evicted_hashes: tuple[int, ...] = ()
    skipped_hashes: tuple[int, ...] = field(default=())


class TierIndex:
    def __init__(self, name: str, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"tier {name!r}: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self._by_hash: dict[int, _Entry] = {}
        self._by_slot: list[_Entry | None] = [None] * num_slots
        # Slots handed out lowest first, so stores of one batch tend to land on adjacent slots
        # that handlers can move with one copy.
        self._free_slots: list[int] = list(range(num_slots))
        self._evictable: list[tuple[int, int, int, int]] = []  # (priority, released_at, slot, hash)
        self._clock = itertools.count(1)
        self._slot_failures: dict[int, int] = {}
        self.retired_slots: set[int] = set()

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free_slots) - len(self.retired_slots)

    @property
    def num_free(self) -> int:
        return len(self._free_slots)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    def is_readable(self, block_hash: int) -> bool:
        entry = self._by_hash.get(block_hash)
        return entry is not None and entry.is_ready

    def slot_of(self, block_hash: int) -> int | None:
        entry = self._by_hash.get(block_hash)
        return entry.slot if entry is not None and entry.is_ready else None

    def match_prefix(self, block_hashes: Sequence[int]) -> int:
        num_matched = 0
        for block_hash in block_hashes:
            if not self.is_readable(block_hash):
                break
            num_matched += 1
        return num_matched

    def readable_hashes(self) -> list[int]:
        return [h for h, e in self._by_hash.items() if e.is_ready]

    # ---- reads -----------------------------------------------------------------------------

    def pin(self, block_hashes: Iterable[int], allow_pending: bool = False) -> list[int]:
        """Pin readable blocks for a read; returns their slots. Raises ``KeyError`` if one is not readable."""
        block_hashes = list(block_hashes)
        entries = [self._by_hash.get(h) for h in block_hashes]
        for block_hash, entry in zip(block_hashes, entries, strict=True):
            if entry is None or not (entry.is_ready or allow_pending):
                raise KeyError(f"tier {self.name!r}: block {block_hash:#x} is not readable")
        for entry in entries:
            assert entry is not None
            entry.num_pins += 1
        return [entry.slot for entry in entries if entry is not None]

    def unpin(self, slots: Iterable[int]) -> None:
        for slot in slots:
            entry = self._by_slot[slot]
            if entry is None or entry.num_pins <= 0:
                raise KeyError(f"tier {self.name!r}: slot {slot} is not pinned")
            entry.num_pins -= 1
            if entry.num_pins == 0:
                self._release(entry)

    # ---- writes ----------------------------------------------------------------------------

    def prepare_store(
        self, block_hashes: Sequence[int], priorities: Sequence[int] | None = None
    ) -> StoreAllocation | None:
        new_hashes: list[int] = []
        slots: list[int] = []
        evicted: list[int] = []
        skipped: list[int] = []
        seen: set[int] = set()
        for i, block_hash in enumerate(block_hashes):
            if block_hash in self._by_hash or block_hash in seen:
                continue
            slot = self._take_slot(evicted)
            if slot is None:
                skipped.extend(h for h in block_hashes[i:] if h not in self._by_hash)
                break
            seen.add(block_hash)
            priority = priorities[i] if priorities is not None else 0
            entry = _Entry(block_hash, slot, priority=priority)
            self._by_hash[block_hash] = entry
            self._by_slot[slot] = entry
            new_hashes.append(block_hash)
            slots.append(slot)
        if not new_hashes:
            return None if skipped else StoreAllocation((), (), tuple(evicted))
        return StoreAllocation(tuple(new_hashes), tuple(slots), tuple(evicted), tuple(skipped))

    def complete_store(self, block_hashes: Iterable[int], success: bool) -> None:
        for block_hash in block_hashes:
            entry = self._by_hash.get(block_hash)
            if entry is None or entry.is_ready:
                continue
            if success:
                entry.is_ready = True
                self._release(entry)
            else:
                self._fail(entry)

    def remove(self, block_hashes: Iterable[int]) -> list[int]:
        """Forget blocks; returns the hashes that were held."""
        removed = []
        for block_hash in block_hashes:
            entry = self._by_hash.get(block_hash)
            if entry is None:
                continue
            removed.append(block_hash)
            if entry.num_pins:
                del self._by_hash[block_hash]
                entry.is_removed = True
            else:
                self._drop(entry)
        return removed

    def clear(self) -> list[int]:
        """Forget every unpinned block; returns their hashes."""
        return self.remove([h for h, e in list(self._by_hash.items()) if not e.num_pins])

    def restore(self, blocks: dict[int, int]) -> None:
        """Seed readable blocks ``{hash: slot}``; slots out of range or taken are ignored."""
        taken = set()
        for block_hash, slot in blocks.items():
            if not 0 <= slot < self.num_slots or self._by_slot[slot] is not None or slot in taken:
                continue
            if block_hash in self._by_hash:
                continue
            entry = _Entry(block_hash, slot, is_ready=True)
            self._by_hash[block_hash] = entry
            self._by_slot[slot] = entry
            taken.add(slot)
            self._release(entry)
        self._free_slots = [s for s in self._free_slots if s not in taken]
        heapq.heapify(self._free_slots)

    # ---- internals -------------------------------------------------------------------------

    def _release(self, entry: _Entry) -> None:
        if entry.is_removed:
            self._drop(entry)
            return
        entry.released_at = next(self._clock)
        if len(self._evictable) > 4 * self.num_slots + 64:
            self._compact_evictable()
        heapq.heappush(
            self._evictable, (entry.priority, entry.released_at, entry.slot, entry.block_hash)
        )

    def _compact_evictable(self) -> None:
        self._evictable = [
            (e.priority, e.released_at, e.slot, e.block_hash)
            for e in self._by_slot
            if e is not None and e.is_ready and not e.num_pins and not e.is_removed
        ]
        heapq.heapify(self._evictable)

    def _take_slot(self, evicted: list[int]) -> int | None:
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        while self._evictable:
            _, released_at, slot, block_hash = heapq.heappop(self._evictable)
            entry = self._by_slot[slot]
            # Heap items go stale when a block is pinned again or its slot reused: skip those.
            if (
                entry is None
                or entry.block_hash != block_hash
                or entry.released_at != released_at
                or entry.num_pins
                or not entry.is_ready
            ):
                continue
            del self._by_hash[block_hash]
            self._by_slot[slot] = None
            evicted.append(block_hash)
            return slot
        return None

    def _fail(self, entry: _Entry) -> None:
        failures = self._slot_failures[entry.slot] = self._slot_failures.get(entry.slot, 0) + 1
        if entry.num_pins:
            # A chained copy still holds the slot: it is freed when that copy unpins it.
            del self._by_hash[entry.block_hash]
            entry.is_removed = True
            return
        if failures < MAX_SLOT_FAILURES:
            self._drop(entry)
            return
        del self._by_hash[entry.block_hash]
        self._by_slot[entry.slot] = None
        self.retired_slots.add(entry.slot)

    def _drop(self, entry: _Entry) -> None:
        if self._by_hash.get(entry.block_hash) is entry:
            del self._by_hash[entry.block_hash]
        if self._by_slot[entry.slot] is entry:
            self._by_slot[entry.slot] = None
            heapq.heappush(self._free_slots, entry.slot)
