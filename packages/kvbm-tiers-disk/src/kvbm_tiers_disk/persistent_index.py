"""The disk tier's index in memory, and how it reaches ``kvbm-disk-rank<r>.index`` durably.

Runs in each worker process, any thread. Operations:
- ``PersistentIndex(slots_file, path, counters, ...)``: load the index file (format:
  :mod:`kvbm_tiers_disk.index_file`), keep the entries of slots the tier still has and, with
  ``verify``, whose slot header agrees; start the background flusher; register for the exit
  flush (:mod:`kvbm_tiers_disk.exit_flush`).
- ``persisted_blocks()``: block hash -> slot found at start; ``stored_blocks()``: the same now.
- ``add(slot, block_hash, checksum)`` / ``forget(slot_ids)`` / ``clear()``: memory only.
- ``flush_index()``: write the file now if anything changed; False (counted, logged once)
  when it could not be written.
- ``close()``: stop the flusher and flush a last time.

Durability: the file is rewritten only after an fdatasync of the slots file, so it never lists
bytes the disk may not have; at most every ``flush_secs``, on ``close()`` and when the process
exits without it (``atexit``, SIGTERM). After a crash it may be up to that old; every slot
carries its own header, so a stale entry costs a failed load, never wrong KV. Once the slots
file is deleted or replaced underneath, the index file is removed and never written again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvbm_tiers_disk import exit_flush
from kvbm_tiers_disk.counters import DiskCounters
from kvbm_tiers_disk.index_file import IndexEntries, read_index, write_index
from kvbm_tiers_disk.slots_file import SlotsFile

__all__ = ["PersistentIndex"]

log = logging.getLogger(__name__)


class PersistentIndex:
    def __init__(
        self,
        slots_file: SlotsFile,
        path: Path,
        counters: DiskCounters,
        *,
        verify: bool = True,
        flush_secs: float = 1.0,
        rank: int = 0,
    ) -> None:
        self.slots_file = slots_file
        self.path = path
        self._counters = counters
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._is_dirty = False
        self._is_file_lost = False
        self._persisted = self._load(verify)
        self._entries: IndexEntries = dict(self._persisted)
        self._flush_secs = flush_secs
        self._is_closed = False
        self._wake = threading.Condition()
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"kvbm-disk-index-rank{rank}", daemon=True
        )
        self._flusher.start()
        exit_flush.register(self)

    # ------------------------------------------------------------------ loading

    def _load(self, verify: bool) -> IndexEntries:
        for leftover in self.path.parent.glob(f"{self.path.name}.tmp-*"):
            leftover.unlink(missing_ok=True)  # a crash mid-flush; we hold the rank's lock
        entries = read_index(self.path, self.slots_file.fingerprint) or {}
        num_slots = self.slots_file.num_slots
        kept = {slot: entry for slot, entry in entries.items() if slot < num_slots}
        if verify and kept:
            with ThreadPoolExecutor(16, thread_name_prefix="kvbm-disk-verify") as pool:
                is_valid = list(pool.map(self._is_entry_valid, kept.items()))
            kept = {
                slot: entry for (slot, entry), ok in zip(kept.items(), is_valid, strict=True) if ok
            }
        num_rejected = len(entries) - len(kept)
        if num_rejected:
            self._counters.count("index_entries_rejected", num_rejected)
            log.warning(
                "kvbm disk tier: %d of %d index entries in %s do not match their slots (stale "
                "index, torn writes or a smaller tier); dropped them",
                num_rejected,
                len(entries),
                self.path,
            )
        if kept:
            log.info("kvbm disk tier: %d blocks persisted in %s", len(kept), self.slots_file.path)
        return kept

    def _is_entry_valid(self, item: tuple[int, tuple[int, int]]) -> bool:
        slot, (block_hash, checksum) = item
        return self.slots_file.is_header_valid(slot, block_hash, checksum)

    # ------------------------------------------------------------------ entries

    def persisted_blocks(self) -> dict[int, int]:
        """Block hash -> slot found on disk at start (verified index entries and headers)."""
        return {block_hash: slot for slot, (block_hash, _) in sorted(self._persisted.items())}

    def stored_blocks(self) -> dict[int, int]:
        """Block hash -> slot of every block the tier holds now."""
        with self._lock:
            items = sorted(self._entries.items())
        return {block_hash: slot for slot, (block_hash, _) in items}

    @property
    def num_stored(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, slot: int, block_hash: int, checksum: int) -> None:
        with self._lock:
            self._entries[slot] = (block_hash, checksum)
            self._is_dirty = True

    def forget(self, slot_ids: Iterable[int]) -> None:
        with self._lock:
            for slot in slot_ids:
                if self._entries.pop(slot, None) is not None:
                    self._is_dirty = True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._is_dirty = True

    # ------------------------------------------------------------------ flushing

    def flush_index(self) -> bool:
        """Write the index if it changed; False (logged, counted) when it could not be written."""
        with self._flush_lock:
            with self._lock:
                if not self._is_dirty:
                    return True
                snapshot, self._is_dirty = dict(self._entries), False
            if not self._is_slots_file_present():
                return False
            try:
                self.slots_file.sync()  # never list a block the disk may not hold yet
                write_index(self.path, self.slots_file.fingerprint, snapshot)
            except OSError as exc:
                with self._lock:
                    self._is_dirty = True
                self._counters.count("index_flush_errors")
                self._counters.log_once(
                    ("index", exc.errno),
                    logging.ERROR,
                    "kvbm disk tier: cannot write index %s (%s); blocks stay readable but a "
                    "restart will not find them",
                    self.path,
                    exc.strerror or exc,
                )
                return False
            self._counters.count("index_flushes")
            return True

    def _is_slots_file_present(self) -> bool:
        if self._is_file_lost:
            return False
        if self.slots_file.is_present():
            return True
        self._is_file_lost = True
        self._counters.count("file_lost")
        self.path.unlink(missing_ok=True)
        log.error(
            "kvbm disk tier: %s was deleted or replaced underneath kvbm; blocks stay readable "
            "from the open file until shutdown but are not persisted (restart to recreate it)",
            self.slots_file.path,
        )
        return False

    def _flush_loop(self) -> None:
        while True:
            with self._wake:
                if not self._is_closed:
                    self._wake.wait(self._flush_secs)
                if self._is_closed:
                    return
            try:
                self.flush_index()
            except Exception:  # the flusher must survive anything; the error is visible here
                log.exception("kvbm disk tier: index flush failed")

    def close(self) -> None:
        """Stop the flusher, then write the index a last time."""
        with self._wake:
            self._is_closed = True
            self._wake.notify_all()
        self._flusher.join()
        self.flush_index()
