"""The disk tier's index in memory, and how it reaches disk durably and incrementally.

Runs in each worker process, any thread. Two files per rank: ``kvbm-disk-rank<r>.index``, a
snapshot (:mod:`kvbm_tiers_disk.index_file`), and ``kvbm-disk-rank<r>.journal``, the changes
since it (:mod:`kvbm_tiers_disk.journal`). In memory: compact arrays
(:mod:`kvbm_tiers_disk.slot_table`, 17 bytes per slot). Operations:
- ``PersistentIndex(slots_file, path, counters, ...)``: load the snapshot and replay its
  journal (cutting a torn tail), keep the entries of slots the tier still has and, with
  ``verify``, read every listed slot's header first (slow: one read per block; by default the
  index is trusted and each load verifies its slot, so a stale entry costs a failed load,
  never a wrong byte; ``verify_in_background`` reads them after start, one at a time, and
  drops the entries they contradict); start the background flusher; register for the exit flush
  (:mod:`kvbm_tiers_disk.exit_flush`).
- ``persisted_blocks()``: block hash -> slot found at start (a ``BlockMap``: sorted arrays);
  ``stored_blocks()``: the same now.
- ``add(slot, block_hash, checksum)`` / ``forget(slot_ids)`` / ``clear()``: memory only.
- ``flush_index()``: make the changes durable now: append them to the journal as one batch,
  or compact (write a new snapshot, then start an empty journal) once the journal outgrows
  the snapshot (``compact_min_bytes`` at least), after a ``clear()`` or when the files found
  at start could not be continued (missing, refused, of the previous format). False (counted,
  logged once) when it could not be written; the changes are retried at the next flush.
- ``close()``: stop the flusher and flush a last time.

Durability: a flush writes only after an fdatasync of the slots file, so the index never
lists bytes the disk may not have; every ``flush_secs``, on ``close()`` and when the process
exits without it (``atexit``, SIGTERM). An append costs the changed slots, not the whole
index. After a crash the index may be up to one period old. Once the slots file is deleted or
replaced underneath, both index files are removed and never written again.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kvbm_tiers_disk import exit_flush
from kvbm_tiers_disk.counters import DiskCounters
from kvbm_tiers_disk.errors import DiskBlockError
from kvbm_tiers_disk.index_file import ENTRY_DTYPE, read_snapshot, write_snapshot
from kvbm_tiers_disk.journal import JournalWriter, create_journal, read_journal
from kvbm_tiers_disk.slot_table import BlockMap, SlotTable
from kvbm_tiers_disk.slots_file import SlotsFile

__all__ = ["PersistentIndex", "COMPACT_MIN_BYTES"]

log = logging.getLogger(__name__)

COMPACT_MIN_BYTES = 4 << 20
"""A journal is never compacted below this size (replaying 4 MiB takes milliseconds)."""


class PersistentIndex:
    def __init__(
        self,
        slots_file: SlotsFile,
        path: Path,
        counters: DiskCounters,
        *,
        verify: bool = False,
        flush_secs: float = 1.0,
        rank: int = 0,
        compact_min_bytes: int | None = None,
        verify_in_background: bool = False,
    ) -> None:
        self.slots_file = slots_file
        self.path = path
        self.journal_path = path.with_suffix(".journal")
        self._counters = counters
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._table = SlotTable(slots_file.num_slots)
        self._writer: JournalWriter | None = None
        self._generation = 0
        self._compact_min_bytes = compact_min_bytes or COMPACT_MIN_BYTES
        self._snapshot_bytes = 0
        self._needs_compaction = True  # until a journal to append to is open
        self._is_dirty = False  # something to write besides the table's changes
        self._is_file_lost = False
        self._persisted = self._load(verify)
        self._flush_secs = flush_secs
        self._is_closed = False
        self._wake = threading.Condition()
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"kvbm-disk-index-rank{rank}", daemon=True
        )
        self._flusher.start()
        self._verifier: threading.Thread | None = None
        if verify_in_background and not verify and self._persisted:
            self._verifier = threading.Thread(
                target=self._verify_loop, name=f"kvbm-disk-verify-rank{rank}", daemon=True
            )
            self._verifier.start()
        exit_flush.register(self)

    # ------------------------------------------------------------------ loading

    def _load(self, verify: bool) -> BlockMap:
        for name in (self.path.name, self.journal_path.name):
            for leftover in self.path.parent.glob(f"{name}.tmp-*"):
                leftover.unlink(missing_ok=True)  # a crash mid-compaction; we hold the lock
        num_listed, num_dropped = self._read_files()
        if verify and self._table.num_stored:
            num_dropped += self._verify_all()
        if num_dropped:
            self._counters.count("index_entries_rejected", num_dropped)
            log.warning(
                "kvbm disk tier: %d of %d index entries in %s do not match their slots (stale "
                "index, torn writes or a smaller tier); dropped them",
                num_dropped,
                num_listed,
                self.path,
            )
        if self._table.num_stored:
            log.info(
                "kvbm disk tier: %d blocks persisted in %s",
                self._table.num_stored,
                self.slots_file.path,
            )
        return self._table.block_map()

    def _read_files(self) -> tuple[int, int]:
        """Load the snapshot and its journal; (entries listed, entries dropped)."""
        fingerprint = self.slots_file.fingerprint
        snapshot = read_snapshot(self.path, fingerprint)
        # A fresh series of generations, so that no journal left from before (of a lost or
        # refused snapshot) can ever continue the snapshot the next compaction writes.
        self._generation = secrets.randbits(62)
        if snapshot is None:
            self._is_dirty = self.path.exists()  # overwrite a refused file at the first flush
            return 0, 0
        if not snapshot.is_migrated:
            self._generation = snapshot.generation
        self._snapshot_bytes = snapshot.entries.nbytes
        num_dropped = self._table.apply_entries(snapshot.entries)
        replay = None
        if not snapshot.is_migrated:
            replay = read_journal(self.journal_path, fingerprint, snapshot.generation)
        num_listed = len(snapshot.entries)
        if replay is not None:
            num_dropped += self._table.apply_records(replay.records)
            num_listed += len(replay.records)
            try:
                self._writer = JournalWriter.open(
                    self.journal_path, snapshot.generation, replay.good_bytes
                )
                self._needs_compaction = False
            except OSError as exc:
                log.warning("kvbm disk tier: cannot append to %s (%s)", self.journal_path, exc)
        self._is_dirty = self._needs_compaction  # migrate, or start the missing journal
        return num_listed, num_dropped

    def _verify_all(self) -> int:
        """Read every listed slot's header; drop the entries it contradicts (how many)."""
        slot_ids = np.flatnonzero(self._table.is_stored)
        items = zip(
            slot_ids.tolist(),
            self._table.hashes[slot_ids].tolist(),
            self._table.checksums[slot_ids].tolist(),
            strict=True,
        )
        with ThreadPoolExecutor(16, thread_name_prefix="kvbm-disk-verify") as pool:
            is_valid = list(pool.map(lambda item: self.slots_file.is_header_valid(*item), items))
        bad = slot_ids[~np.array(is_valid, bool)]
        for slot in bad.tolist():
            self._table.remove(slot)
        return len(bad)

    def _verify_loop(self) -> None:
        """Read the header of every slot listed at start, one at a time, dropping the entries
        it contradicts; stops when the tier closes. A dropped entry would have cost a failed
        load; the leader still learns of it that way."""
        num_dropped = 0
        for slot in np.sort(self._persisted.slot_ids).tolist():
            with self._lock:
                if self._is_closed or not self._table.is_stored[slot]:
                    continue
                expected = int(self._table.hashes[slot]), int(self._table.checksums[slot])
            try:
                self.slots_file.begin_io()
            except DiskBlockError:
                break  # closing
            try:
                is_valid = self.slots_file.is_header_valid(slot, *expected)
            finally:
                self.slots_file.end_io()
            if is_valid:
                continue
            with self._lock:  # unless the slot was rewritten meanwhile
                current = int(self._table.hashes[slot]), int(self._table.checksums[slot])
                if self._table.is_stored[slot] and current == expected:
                    self._table.remove(slot)
                    num_dropped += 1
        if num_dropped:
            self._counters.count("index_entries_rejected", num_dropped)
            log.warning(
                "kvbm disk tier: background verification dropped %d index entries of %s whose "
                "slot header does not match",
                num_dropped,
                self.slots_file.path,
            )

    # ------------------------------------------------------------------ entries

    def persisted_blocks(self) -> BlockMap:
        """Block hash -> slot found on disk at start (index entries, verified when asked)."""
        return self._persisted

    def stored_blocks(self) -> BlockMap:
        """Block hash -> slot of every block the tier holds now."""
        with self._lock:
            return self._table.block_map()

    @property
    def num_stored(self) -> int:
        return self._table.num_stored

    @property
    def nbytes(self) -> int:
        """Memory the index keeps per tier: the slot table and the start-up block map."""
        return self._table.nbytes + self._persisted.nbytes

    def add(self, slot: int, block_hash: int, checksum: int) -> None:
        with self._lock:
            self._table.store(slot, block_hash, checksum)

    def forget(self, slot_ids: Iterable[int]) -> None:
        with self._lock:
            for slot in slot_ids:
                self._table.remove(slot)

    def clear(self) -> None:
        with self._lock:
            self._table.clear()
            self._needs_compaction = self._is_dirty = True  # an empty snapshot says it best

    # ------------------------------------------------------------------ flushing

    def flush_index(self) -> bool:
        """Make the changes durable; False (logged, counted) when they could not be written."""
        with self._flush_lock:
            with self._lock:
                if not (self._is_dirty or self._table.num_changed):
                    return True
                is_compaction = self._is_compaction_due()
                if is_compaction:
                    entries, records = self._table.entries(), None
                    self._table.forget_changes()
                else:
                    entries, records = None, self._table.take_changes()
                self._is_dirty = False
            if not self._is_slots_file_present():
                return False
            try:
                self.slots_file.sync()  # never list a block the disk may not hold yet
                if entries is not None:
                    self._compact(entries)
                elif self._writer is not None and records is not None:
                    self._writer.append(records)
            except OSError as exc:
                self._retry_later(records)
                self._flush_failed(exc)
                return False
            self._counters.count("index_flushes")
            if is_compaction:
                self._counters.count("index_compactions")
            return True

    def _is_compaction_due(self) -> bool:
        if self._needs_compaction or self._writer is None:
            return True
        return self._writer.num_bytes > max(self._compact_min_bytes, self._snapshot_bytes)

    def _compact(self, entries: np.ndarray) -> None:
        """Write a snapshot of ``entries`` (the next generation), then an empty journal."""
        self._needs_compaction = True  # until both files are written
        generation = self._generation + 1
        write_snapshot(self.path, self.slots_file.fingerprint, generation, entries)
        self._generation, self._snapshot_bytes = generation, len(entries) * ENTRY_DTYPE.itemsize
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        # A crash before the new journal is in place leaves the old one, of the previous
        # generation: it is ignored at start, and the snapshot holds everything it said.
        self._writer = create_journal(self.journal_path, self.slots_file.fingerprint, generation)
        self._needs_compaction = False

    def _retry_later(self, records: np.ndarray | None) -> None:
        with self._lock:
            if records is None:
                self._is_dirty = True  # the compaction is still due
            else:
                self._table.restore_changes(records)

    def _flush_failed(self, exc: OSError) -> None:
        self._counters.count("index_flush_errors")
        self._counters.log_once(
            ("index", exc.errno),
            logging.ERROR,
            "kvbm disk tier: cannot write index %s (%s); blocks stay readable but a "
            "restart will not find them",
            self.path,
            exc.strerror or exc,
        )

    def _is_slots_file_present(self) -> bool:
        if self._is_file_lost:
            return False
        if self.slots_file.is_present():
            return True
        self._is_file_lost = True
        self._counters.count("file_lost")
        self.path.unlink(missing_ok=True)
        self.journal_path.unlink(missing_ok=True)
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
        if self._verifier is not None:
            self._verifier.join()
        self.flush_index()
        with self._flush_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
