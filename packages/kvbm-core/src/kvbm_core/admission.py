"""Admission policies: which blocks deserve a slot in a tier (leader process).

- ``FrequencyFilter``: Dynamo's disk filter ("SSD lifespan protection"). Each sighting of a
  hash doubles its count (the first sets it to 1); every ``decay_secs`` all counts drop by one
  and zeros are forgotten; a block is admitted once its count reaches ``threshold``. At most
  ``max_entries`` hashes are remembered (the lowest counts are forgotten first).
- ``AlwaysAdmit``: admits everything (``DISABLE_DISK_OFFLOAD_FILTER``).

``should_admit(hash)`` records a sighting and answers; ``is_admitted(hash)`` only answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["AdmissionPolicy", "FrequencyFilter", "AlwaysAdmit"]


class AdmissionPolicy(Protocol):
    def should_admit(self, block_hash: int) -> bool: ...

    def is_admitted(self, block_hash: int) -> bool: ...


class AlwaysAdmit:
    def should_admit(self, block_hash: int) -> bool:
        return True

    def is_admitted(self, block_hash: int) -> bool:
        return True


class FrequencyFilter:
    def __init__(
        self,
        threshold: int = 2,
        decay_secs: float = 600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or decay_secs <= 0 or max_entries < 1:
            raise ValueError("FrequencyFilter needs threshold >= 1, decay_secs > 0, max_entries >= 1")
        self.threshold = threshold
        self.decay_secs = decay_secs
        self.max_entries = max_entries
        self._clock = clock
        self._counts: dict[int, int] = {}
        self._last_decay = clock()

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, block_hash: int) -> int:
        self._decay()
        return self._counts.get(block_hash, 0)

    def is_admitted(self, block_hash: int) -> bool:
        return self.count(block_hash) >= self.threshold

    def should_admit(self, block_hash: int) -> bool:
        self._decay()
        count = self._counts.get(block_hash)
        # Saturate so a hot block cannot grow an unbounded integer.
        count = 1 if count is None else min(count * 2, 1 << 20)
        self._counts[block_hash] = count
        if len(self._counts) > self.max_entries:
            self._prune()
        return count >= self.threshold

    def _decay(self) -> None:
        periods = int((self._clock() - self._last_decay) // self.decay_secs)
        if periods <= 0:
            return
        self._last_decay += periods * self.decay_secs
        self._counts = {h: c - periods for h, c in self._counts.items() if c > periods}

    def _prune(self) -> None:
        keep = sorted(self._counts.items(), key=lambda item: item[1], reverse=True)
        self._counts = dict(keep[: self.max_entries * 9 // 10])
