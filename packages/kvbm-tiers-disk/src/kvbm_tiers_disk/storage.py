"""One rank's share of the disk tier: block I/O on a slots file, kept in step with its index.

Runs in each worker process. ``DiskStorage`` composes the slots file
(:mod:`kvbm_tiers_disk.slots_file`: opening, ownership and link checks, sizing, headers, one
I/O per slot) and the persistent index (:mod:`kvbm_tiers_disk.persistent_index`: load,
flush, durability, exit flush); what is here is block I/O and the accounting around it.
Operations (any thread unless said otherwise):
- ``DiskStorage(layout, num_slots, directory, ...)``: check the directory (creatable,
  writable, private to this user: see ``kvbm_core.private_dir``; enough free space:
  ``ConfigError`` naming the directory, the bytes needed and the bytes free), open or create
  ``kvbm-disk-rank<r>.slots`` (0600, never through a link, refused when another user could
  change it, locked against a second process), preallocate ``num_slots`` slots, open it with
  O_DIRECT when the filesystem allows (a fallback is logged once), load the index (and, with
  ``verify_on_open``, read every listed slot's header).
- ``write_block(slot, block_hash, src)``: write one block and its header; returns the payload
  checksum. ``read_block(slot, block_hash, dst)``: read one block and verify its header (slot,
  block hash, layout) and checksum before copying it to ``dst``. Both raise ``DiskBlockError``
  and never anything else for an I/O or integrity failure; ``is_corrupt`` says the block is
  gone. ``write_slot``/``read_slot`` do the same on a caller's slot buffer (header and payload
  contiguous, one I/O), which is how the GPU handlers avoid a copy through their bounce buffer.
  ``prepare_write``/``complete_write``, ``verify_read``, ``io_failure`` and
  ``begin_io``/``end_io`` are their steps, for handlers that do the I/O themselves (NIXL).
- ``persisted_blocks()``: block hash -> slot that the previous process left on disk, from the
  verified index files (what the leader's index is seeded with; a ``BlockMap``, a read-only
  mapping over sorted arrays). ``stored_blocks()``: the same for what the tier holds now.
- ``record_evicted(slot_ids)`` / ``record_cleared()``: forget slots the leader evicted.
- ``sync()``: fdatasync the slots file (completed writes become durable).
- ``flush_index()``: make index changes durable now (a journal append); also done every
  ``index_flush_secs`` by a background thread and on ``close()``.
- ``stats``: a snapshot of the counters (``corrupt_blocks``, ``io_errors``, ...).

Index contract: a slot's entry is dropped when a write to it starts and added when the write
completes; evictions are recorded with ``record_evicted``. Calls only touch memory; the changes
are appended to the index journal (after an fdatasync of the slots file, so it never lists
bytes the disk may not have) every ``index_flush_secs`` (1 s by default), on ``close()`` and
when the process exits without it (``atexit``, SIGTERM: :mod:`kvbm_tiers_disk.exit_flush`). After a crash the
index may be up to that old; every slot carries its own header, so a stale entry costs a failed
load (reported in ``bad_block_hashes``), never wrong KV.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from kvbm_core.config import ConfigError
from kvbm_core.layout import KvLayout
from kvbm_core.transfer import DISK, Storage
from kvbm_tiers_disk.buffers import aligned_array
from kvbm_tiers_disk.counters import STAT_NAMES, DiskCounters
from kvbm_tiers_disk.errors import DiskBlockError
from kvbm_tiers_disk.persistent_index import PersistentIndex
from kvbm_tiers_disk.slot_format import (
    ALIGN,
    HEADER_BYTES,
    MAX_HASH,
    SlotGeometry,
    layout_fingerprint,
)
from kvbm_tiers_disk.slot_table import BlockMap
from kvbm_tiers_disk.slots_file import SlotsFile, closed_on_failure

__all__ = ["DiskStorage", "DiskBlockError", "STAT_NAMES"]

log = logging.getLogger(__name__)

_MAX_LOGGED_CORRUPT = 100


class DiskStorage(Storage):
    """One rank's disk tier (see module doc); ``slots_file`` and ``index`` are its parts."""

    medium = DISK
    verifies_block_hashes = True  # every read checks the slot header's hash and checksum

    def __init__(
        self,
        layout: KvLayout,
        num_slots: int,
        directory: str | os.PathLike[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        use_o_direct: bool = True,
        index_flush_secs: float = 1.0,
        verify_on_open: bool = False,
        index_compact_bytes: int | None = None,
        verify_in_background: bool = False,
        io_depth: int | None = None,
        model_id: str | None = None,
    ) -> None:
        if num_slots <= 0:
            raise ConfigError(
                f"the disk tier was sized to {num_slots} blocks; raise KVBM_DISK_CACHE_GB (one "
                f"block is {layout.bytes_per_block} bytes) or unset it to disable the disk tier"
            )
        self.layout = layout
        self.num_slots = num_slots
        self.rank = rank
        self.world_size = world_size
        self.geometry = SlotGeometry(layout.bytes_per_block)
        self.fingerprint = layout_fingerprint(layout, rank, world_size, model_id)
        self._counters = DiskCounters()
        self._local = threading.local()
        self.slots_file = SlotsFile(
            Path(directory),
            rank,
            self.geometry,
            num_slots,
            self.fingerprint,
            use_o_direct=use_o_direct,
            io_depth=io_depth,
        )
        self.directory = self.slots_file.directory
        self.path = self.slots_file.path
        self.is_o_direct = self.slots_file.is_o_direct
        self.index_path = self.directory / f"kvbm-disk-rank{rank}.index"
        with closed_on_failure(self.slots_file.close, self.path):
            self.index = PersistentIndex(
                self.slots_file,
                self.index_path,
                self._counters,
                verify=verify_on_open,
                flush_secs=index_flush_secs,
                rank=rank,
                compact_min_bytes=index_compact_bytes,
                verify_in_background=verify_in_background,
            )

    # ------------------------------------------------------------------ block I/O

    def write_block(self, slot: int, block_hash: int | None, src: np.ndarray) -> int:
        """Write ``src[:bytes_per_block]`` with its header to ``slot``; the payload checksum.

        A block written without a hash (``None``) is stored under hash 0 and not listed in the
        index: with no identity it cannot be found again after a restart.
        """
        buffer = self.slot_buffer()
        buffer[HEADER_BYTES : HEADER_BYTES + self.geometry.bytes_per_block] = src[
            : self.geometry.bytes_per_block
        ]
        return self.write_slot(slot, block_hash, buffer)

    def read_block(self, slot: int, block_hash: int | None, dst: np.ndarray) -> None:
        """Fill ``dst[:bytes_per_block]`` from ``slot`` once its header (slot, block hash,
        layout) and checksum are verified; on failure ``dst`` is left untouched."""
        payload = self.read_slot(slot, block_hash, self.slot_buffer())
        dst[: payload.nbytes] = payload

    def write_slot(self, slot: int, block_hash: int | None, buffer: np.ndarray) -> int:
        """Write a slot buffer whose payload the caller placed at ``buffer[HEADER_BYTES:]``.

        ``buffer`` comes from ``new_slot_buffer``/``slot_buffer`` (aligned, ``stride`` bytes):
        header and payload go out as one contiguous I/O, which devices serve much faster
        than a separate 4 KiB piece. Returns the payload checksum.
        """
        checksum = self.prepare_write(slot, block_hash, buffer)
        try:
            done = self.slots_file.write(slot, buffer)
        except OSError as exc:
            raise self.io_failure("write", slot, exc) from None
        if done != self.io_bytes:
            raise self.io_failure("write", slot, OSError(errno.ENOSPC, "short write"))
        self.complete_write(slot, block_hash, checksum)
        return checksum

    def prepare_write(self, slot: int, block_hash: int | None, buffer: np.ndarray) -> int:
        """Put the header of the payload at ``buffer[HEADER_BYTES:]`` in front of it and drop
        the slot from the index; the payload checksum. Then write ``buffer[:io_bytes]`` at
        ``geometry.offset(slot)`` and call ``complete_write`` (or ``io_failure``)."""
        self._check_io(slot, block_hash)
        self.index.forget([slot])  # a half-written slot must never stay listed under its old block
        return self.slots_file.seal(slot, block_hash, buffer)

    def complete_write(self, slot: int, block_hash: int | None, checksum: int) -> None:
        """Record a slot written in full: list it in the index (when it has a hash), count it."""
        if block_hash is not None:
            self.index.add(slot, block_hash, checksum)
        self._counters.count("blocks_written")
        self._counters.count("bytes_written", self.geometry.bytes_per_block)

    def read_slot(self, slot: int, block_hash: int | None, buffer: np.ndarray) -> np.ndarray:
        """Read ``slot`` into a slot buffer and verify it; the verified payload (a view)."""
        self._check_io(slot, block_hash)
        try:
            done = self.slots_file.read(slot, buffer)
        except OSError as exc:
            raise self.io_failure("read", slot, exc) from None
        return self.verify_read(slot, block_hash, buffer, done)

    def verify_read(
        self, slot: int, block_hash: int | None, buffer: np.ndarray, num_read: int
    ) -> np.ndarray:
        """Verify a slot buffer into which ``num_read`` bytes of ``slot`` were read (header:
        slot, block hash, layout; payload checksum); the verified payload (a view), or
        ``DiskBlockError(is_corrupt=True)``, counted, logged and dropped from the index."""
        try:
            payload = self.slots_file.check(slot, block_hash, buffer, num_read)
        except ValueError as exc:
            raise self._corrupt(slot, block_hash, str(exc)) from None
        self._counters.count("blocks_read")
        self._counters.count("bytes_read", self.geometry.bytes_per_block)
        return payload

    def new_slot_buffer(self, allocate: Callable[[int], np.ndarray] = aligned_array) -> np.ndarray:
        """A buffer for ``read_slot``/``write_slot``: ``stride`` bytes from ``allocate``,
        which must return 4 KiB-aligned memory (e.g. a pinned tensor's numpy view)."""
        buffer = allocate(self.geometry.stride)
        if buffer.ctypes.data % ALIGN or buffer.nbytes < self.geometry.stride:
            raise ValueError(
                f"a slot buffer must be {ALIGN}-aligned and {self.geometry.stride} bytes"
            )
        return buffer

    def slot_buffer(self) -> np.ndarray:
        """This thread's slot buffer (allocated on first use)."""
        buffer = getattr(self._local, "slot", None)
        if buffer is None:
            buffer = self._local.slot = self.new_slot_buffer()
        return buffer

    @property
    def io_bytes(self) -> int:
        """Bytes one slot I/O moves (from the slot's start)."""
        return self.slots_file.io_bytes

    @property
    def fd(self) -> int:
        """The slots file's descriptor; I/O on it goes between ``begin_io`` and ``end_io``."""
        return self.slots_file.fd

    def begin_io(self) -> None:
        """Mark an I/O on the file in progress (``DiskBlockError`` once closed); ``close``
        waits until every one has ended, so a file descriptor is never closed (and its
        number reused) under an I/O."""
        self.slots_file.begin_io()

    def end_io(self) -> None:
        self.slots_file.end_io()

    def _check_io(self, slot: int, block_hash: int | None) -> None:
        if self.slots_file.is_closed:
            raise DiskBlockError(f"disk tier {self.path} is closed")
        if not 0 <= slot < self.num_slots:
            raise DiskBlockError(f"slot {slot} is out of range (the tier has {self.num_slots})")
        if block_hash is not None and not 0 <= block_hash <= MAX_HASH:
            raise DiskBlockError(f"block hash {block_hash} is not an unsigned 64-bit value")

    def io_failure(self, op: str, slot: int, exc: OSError) -> DiskBlockError:
        """Count, log (once per errno) and describe a failed I/O of ``slot``; a failed read's
        block is reported as gone (``is_corrupt``)."""
        self._counters.count("io_errors")
        self._counters.count(f"{op}_failures")
        if exc.errno == errno.ENOSPC:
            self._counters.count("enospc_errors")
        self.index.forget([slot])
        name = errno.errorcode.get(exc.errno or 0, "?")
        self._counters.log_once(
            ("io", op, exc.errno),
            logging.ERROR,
            "kvbm disk tier: %s of slot %d in %s failed: %s (%s); the job fails and the block "
            "is recomputed or stays in the tier above (further %s errors are counted in "
            "stats, logged at debug level)",
            op,
            slot,
            self.path,
            exc.strerror or exc,
            name,
            name,
        )
        return DiskBlockError(
            f"disk {op} of slot {slot} failed: {exc.strerror or exc} ({name})",
            is_corrupt=op == "read",
            errno=exc.errno,
        )

    def _corrupt(self, slot: int, block_hash: int | None, reason: str) -> DiskBlockError:
        self._counters.count("corrupt_blocks")
        self._counters.count("read_failures")
        self.index.forget([slot])
        num_corrupt = self._counters.get("corrupt_blocks")
        level = logging.WARNING if num_corrupt <= _MAX_LOGGED_CORRUPT else logging.DEBUG
        shown = "?" if block_hash is None else f"{block_hash:#x}"
        log.log(
            level,
            "kvbm disk tier: block %s in slot %d of %s failed verification: %s; not served",
            shown,
            slot,
            self.path,
            reason,
        )
        return DiskBlockError(
            f"block in slot {slot} failed verification: {reason}", is_corrupt=True
        )

    # ------------------------------------------------------------------ index

    def persisted_blocks(self) -> BlockMap:
        """Block hash -> slot found on disk at start: the index's entries (their headers
        read first with ``verify_on_open``), as a read-only mapping over sorted arrays."""
        return self.index.persisted_blocks()

    def stored_blocks(self) -> BlockMap:
        """Block hash -> slot of every block this tier holds now."""
        return self.index.stored_blocks()

    def record_evicted(self, slot_ids: Iterable[int]) -> None:
        """Forget slots the leader evicted (cheap: memory only; the file follows later)."""
        self.index.forget(slot_ids)

    def record_cleared(self) -> None:
        self.index.clear()

    def flush_index(self) -> bool:
        """Write the index if it changed; False (logged, counted) when it could not be written."""
        return self.index.flush_index()

    # ------------------------------------------------------------------ misc

    def sync(self) -> None:
        """Make every completed write durable (fdatasync of the slots file)."""
        self.slots_file.sync()

    @property
    def stats(self) -> dict[str, int]:
        snapshot = self._counters.snapshot()
        snapshot["stored_blocks"] = self.index.num_stored
        snapshot["o_direct"] = int(self.is_o_direct)
        return snapshot

    def close(self) -> None:
        """Wait for I/O in progress, write the index, close the file; idempotent."""
        if not self.slots_file.begin_close():
            return
        try:
            self.index.close()
        finally:
            self.slots_file.close()

    def __repr__(self) -> str:
        return f"DiskStorage({self.path}, num_slots={self.num_slots}, o_direct={self.is_o_direct})"
