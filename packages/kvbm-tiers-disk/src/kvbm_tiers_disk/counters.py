"""The disk tier's counters, and its rule of logging each kind of failure loudly only once.

Runs in each worker process, any thread. Shared by the slots file, the persistent index and
block I/O of one :class:`~kvbm_tiers_disk.storage.DiskStorage`. Operations:
- ``count(name, amount)`` / ``get(name)`` / ``snapshot()``: the counters in ``STAT_NAMES``.
- ``log_once(key, level, message, *args)``: log at ``level`` the first time ``key`` is seen,
  at debug level after that (a failing disk must not flood the log; the counters still count).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

__all__ = ["DiskCounters", "STAT_NAMES"]

log = logging.getLogger(__name__)

STAT_NAMES = (
    "blocks_written",
    "blocks_read",
    "bytes_written",
    "bytes_read",
    "write_failures",
    "read_failures",
    "corrupt_blocks",
    "io_errors",
    "enospc_errors",
    "index_flushes",
    "index_compactions",
    "index_flush_errors",
    "index_entries_rejected",
    "file_lost",
)


class DiskCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter(dict.fromkeys(STAT_NAMES, 0))
        self._logged: set[object] = set()

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def get(self, name: str) -> int:
        with self._lock:
            return self._counters[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def log_once(self, key: object, level: int, message: str, *args: object) -> None:
        with self._lock:
            is_first = key not in self._logged
            self._logged.add(key)
        log.log(level if is_first else logging.DEBUG, message, *args)
