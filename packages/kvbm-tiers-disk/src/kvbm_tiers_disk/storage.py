"""One rank's share of the disk tier: a preallocated slots file plus its persistent index.

Runs in each worker process. Operations (any thread unless said otherwise):
- ``DiskStorage(layout, num_slots, directory, ...)``: check the directory (creatable,
  writable, private to this user: see ``kvbm_core.private_dir``; enough free space:
  ``ConfigError`` naming the directory, the bytes needed and the bytes free), open or create
  ``kvbm-disk-rank<r>.slots`` (0600, never through a link, refused when another user could
  change it, locked against a second process), preallocate ``num_slots`` slots, open it with O_DIRECT when the filesystem allows
  (a fallback is logged once), load and verify the index.
- ``write_block(slot, block_hash, src)``: write one block and its header; returns the payload
  checksum. ``read_block(slot, block_hash, dst)``: read one block and verify its header (slot,
  block hash, layout) and checksum before copying it to ``dst``. Both raise ``DiskBlockError``
  and never anything else for an I/O or integrity failure; ``is_corrupt`` says the block is
  gone. ``write_slot``/``read_slot`` do the same on a caller's slot buffer (header and payload
  contiguous, one I/O), which is how the GPU handlers avoid a copy through their bounce buffer.
  ``prepare_write``/``complete_write``, ``verify_read``, ``io_failure`` and
  ``begin_io``/``end_io`` are their steps, for handlers that do the I/O themselves (NIXL).
- ``persisted_blocks()``: block hash -> slot that the previous process left on disk, after the
  index file and each listed slot's header were verified (what the leader's index is seeded
  with). ``stored_blocks()``: the same for what the tier holds now.
- ``record_evicted(slot_ids)`` / ``record_cleared()``: forget slots the leader evicted.
- ``sync()``: fdatasync the slots file (completed writes become durable).
- ``flush_index()``: write the index now; also done every ``index_flush_secs`` by a background
  thread and on ``close()``.
- ``stats``: a snapshot of the counters (``corrupt_blocks``, ``io_errors``, ...).

Index contract: a slot's entry is dropped when a write to it starts and added when the write
completes; evictions are recorded with ``record_evicted``. Calls only touch memory; the file is
rewritten (after an fdatasync of the slots file, so it never lists bytes the disk may not
have) at most every ``index_flush_secs`` (1 s by default), on ``close()`` and when the process
exits without it (``atexit``, SIGTERM: :mod:`kvbm_tiers_disk.exit_flush`). After a crash the
index may be up to that old; every slot carries its own header, so a stale entry costs a failed load (reported
in ``bad_block_hashes``), never wrong KV.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from kvbm_core.config import ConfigError
from kvbm_core.layout import KvLayout
from kvbm_core.private_dir import ensure_private_dir, open_private_file
from kvbm_core.transfer import DISK, Storage
from kvbm_tiers_disk import exit_flush
from kvbm_tiers_disk.buffers import aligned_array
from kvbm_tiers_disk.index_file import IndexEntries, read_index, write_index
from kvbm_tiers_disk.slot_format import (
    ALIGN,
    HEADER_BYTES,
    MAX_HASH,
    SlotGeometry,
    SlotHeader,
    check_header,
    layout_fingerprint,
    pack_header,
    payload_checksum,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["DiskStorage", "DiskBlockError", "STAT_NAMES"]

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
    "index_flush_errors",
    "index_entries_rejected",
    "file_lost",
)
_MAX_LOGGED_CORRUPT = 100


def _as_buffer(array: np.ndarray) -> Buffer:
    # Every ndarray exports the buffer protocol, but numpy's stubs declare
    # ``ndarray.__buffer__`` only for Python 3.12+, so for 3.11 mypy needs telling.
    return cast("Buffer", array)


class DiskBlockError(Exception):
    """A block could not be written or read. ``is_corrupt``: its bytes on disk are unusable."""

    def __init__(self, message: str, *, is_corrupt: bool = False, errno: int | None = None):
        super().__init__(message)
        self.is_corrupt = is_corrupt
        self.errno = errno


class DiskStorage(Storage):
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
        verify_on_open: bool = True,
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
        self.directory = prepare_directory(Path(directory))
        self.path = self.directory / f"kvbm-disk-rank{rank}.slots"
        self.index_path = self.directory / f"kvbm-disk-rank{rank}.index"
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._counters: Counter[str] = Counter(dict.fromkeys(STAT_NAMES, 0))
        self._logged: set[object] = set()
        self._local = threading.local()
        # Some devices (virtio disks backed by a file) serve one large request at a time
        # fastest; io_depth caps the syscalls in flight while hashing and copying overlap.
        self._io_gate = threading.BoundedSemaphore(io_depth) if io_depth else nullcontext()
        self._entries: IndexEntries = {}
        self._is_dirty = False
        self._is_closed = False
        self._num_in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._is_file_lost = False
        self._lock_fd = _open_slots_file(self.path)
        io_fd: int | None = None
        try:
            self._size_file()
            io_fd, self.is_o_direct = self._open_io_fd(use_o_direct)
            self._fd = io_fd
            self._persisted = self._load_index(verify_on_open)
        except BaseException as exc:
            for fd in (io_fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"cannot prepare the disk tier file {str(self.path)!r} ({exc.strerror or exc}); "
                    "point KVBM_DISK_CACHE_DIR at a writable directory on a local disk"
                ) from None
            raise
        self._entries = {slot: entry for slot, entry in self._persisted.items()}
        self._index_flush_secs = index_flush_secs
        self._wake = threading.Condition()
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"kvbm-disk-index-rank{rank}", daemon=True
        )
        self._flusher.start()
        exit_flush.register(self)

    # ------------------------------------------------------------------ opening

    def _size_file(self) -> None:
        need = self.geometry.file_bytes(self.num_slots)
        stat = os.fstat(self._lock_fd)
        if stat.st_size > need:
            os.ftruncate(self._lock_fd, need)
            stat = os.fstat(self._lock_fd)
        missing = max(0, need - stat.st_blocks * 512)
        free = _free_bytes(self.directory)
        if missing > free:
            raise _no_space_error(self.directory, need, missing, free)
        try:
            os.posix_fallocate(self._lock_fd, 0, need)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _no_space_error(
                    self.directory, need, missing, _free_bytes(self.directory)
                ) from None
            log.warning(
                "kvbm disk tier: %s cannot preallocate %s (%s); using a sparse file, so a full "
                "disk shows up as failed stores instead of at start",
                self.directory,
                self.path.name,
                exc.strerror,
            )
            os.ftruncate(self._lock_fd, need)

    def _open_io_fd(self, use_o_direct: bool) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        if use_o_direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, flags | os.O_DIRECT)
            except OSError as exc:
                reason = exc.strerror
            else:
                try:
                    os.preadv(fd, [_as_buffer(aligned_array(ALIGN))], 0)
                    return fd, True
                except OSError as exc:
                    os.close(fd)
                    reason = exc.strerror
            log.warning(
                "kvbm disk tier: O_DIRECT is not supported for %s (%s); using buffered I/O "
                "(reads may be served from the page cache)",
                self.path,
                reason,
            )
        return os.open(self.path, flags), False

    def _load_index(self, verify: bool) -> IndexEntries:
        for leftover in self.directory.glob(f"{self.index_path.name}.tmp-*"):
            leftover.unlink(missing_ok=True)  # a crash mid-flush; we hold the rank's lock
        entries = read_index(self.index_path, self.fingerprint) or {}
        kept = {slot: entry for slot, entry in entries.items() if slot < self.num_slots}
        if verify and kept:
            with ThreadPoolExecutor(16, thread_name_prefix="kvbm-disk-verify") as pool:
                is_valid = list(pool.map(self._is_header_valid, kept.items()))
            kept = {
                slot: entry for (slot, entry), ok in zip(kept.items(), is_valid, strict=True) if ok
            }
        num_rejected = len(entries) - len(kept)
        if num_rejected:
            self._count("index_entries_rejected", num_rejected)
            log.warning(
                "kvbm disk tier: %d of %d index entries in %s do not match their slots (stale "
                "index, torn writes or a smaller tier); dropped them",
                num_rejected,
                len(entries),
                self.index_path,
            )
        if kept:
            log.info("kvbm disk tier: %d blocks persisted in %s", len(kept), self.path)
        return kept

    def _is_header_valid(self, item: tuple[int, tuple[int, int]]) -> bool:
        slot, (block_hash, checksum) = item
        raw = self._header_buffer()
        try:
            if os.preadv(self._fd, [_as_buffer(raw)], self.geometry.offset(slot)) != HEADER_BYTES:
                return False
            header = check_header(
                raw,
                fingerprint=self.fingerprint,
                slot=slot,
                num_bytes=self.geometry.bytes_per_block,
                block_hash=block_hash,
            )
        except (OSError, ValueError):
            return False
        return header.checksum == checksum

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
        io_bytes = self.io_bytes
        try:
            with self._in_flight(), self._io_gate:
                done = os.pwritev(
                    self._fd, [_as_buffer(buffer[:io_bytes])], self.geometry.offset(slot)
                )
        except OSError as exc:
            raise self.io_failure("write", slot, exc) from None
        if done != io_bytes:
            raise self.io_failure("write", slot, OSError(errno.ENOSPC, "short write"))
        self.complete_write(slot, block_hash, checksum)
        return checksum

    def prepare_write(self, slot: int, block_hash: int | None, buffer: np.ndarray) -> int:
        """Put the header of the payload at ``buffer[HEADER_BYTES:]`` in front of it and drop
        the slot from the index; the payload checksum. Then write ``buffer[:io_bytes]`` at
        ``geometry.offset(slot)`` and call ``complete_write`` (or ``io_failure``)."""
        self._check_io(slot, block_hash)
        num_bytes = self.geometry.bytes_per_block
        self._forget([slot])  # a half-written slot must never stay listed under its old block
        checksum = payload_checksum(_as_buffer(buffer[HEADER_BYTES : HEADER_BYTES + num_bytes]))
        header = SlotHeader(self.fingerprint, slot, block_hash or 0, num_bytes, checksum)
        buffer[:HEADER_BYTES] = 0
        pack_header(header, memoryview(_as_buffer(buffer[:HEADER_BYTES])))
        return checksum

    def complete_write(self, slot: int, block_hash: int | None, checksum: int) -> None:
        """Record a slot written in full: list it in the index (when it has a hash), count it."""
        with self._lock:
            if block_hash is not None:
                self._entries[slot] = (block_hash, checksum)
                self._is_dirty = True
            self._counters["blocks_written"] += 1
            self._counters["bytes_written"] += self.geometry.bytes_per_block

    def read_slot(self, slot: int, block_hash: int | None, buffer: np.ndarray) -> np.ndarray:
        """Read ``slot`` into a slot buffer and verify it; the verified payload (a view)."""
        self._check_io(slot, block_hash)
        io_bytes = self.io_bytes
        try:
            with self._in_flight(), self._io_gate:
                done = os.preadv(
                    self._fd, [_as_buffer(buffer[:io_bytes])], self.geometry.offset(slot)
                )
        except OSError as exc:
            raise self.io_failure("read", slot, exc) from None
        return self.verify_read(slot, block_hash, buffer, done)

    def verify_read(
        self, slot: int, block_hash: int | None, buffer: np.ndarray, num_read: int
    ) -> np.ndarray:
        """Verify a slot buffer into which ``num_read`` bytes of ``slot`` were read (header:
        slot, block hash, layout; payload checksum); the verified payload (a view), or
        ``DiskBlockError(is_corrupt=True)``, counted, logged and dropped from the index."""
        num_bytes = self.geometry.bytes_per_block
        if num_read < HEADER_BYTES + num_bytes:
            raise self._corrupt(slot, block_hash, f"short read ({num_read} bytes; file truncated?)")
        try:
            stored = check_header(
                buffer[:HEADER_BYTES],
                fingerprint=self.fingerprint,
                slot=slot,
                num_bytes=num_bytes,
                block_hash=block_hash,
            )
        except ValueError as exc:
            raise self._corrupt(slot, block_hash, str(exc)) from None
        payload = buffer[HEADER_BYTES : HEADER_BYTES + num_bytes]
        if payload_checksum(_as_buffer(payload)) != stored.checksum:
            raise self._corrupt(slot, block_hash, "payload checksum mismatch")
        with self._lock:
            self._counters["blocks_read"] += 1
            self._counters["bytes_read"] += num_bytes
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
        # O_DIRECT moves whole 4 KiB pages; buffered I/O stops at the block's last byte.
        if self.is_o_direct:
            return self.geometry.stride
        return HEADER_BYTES + self.geometry.bytes_per_block

    @property
    def fd(self) -> int:
        """The slots file's descriptor; I/O on it goes between ``begin_io`` and ``end_io``."""
        return self._fd

    def begin_io(self) -> None:
        """Mark an I/O on the file in progress (``DiskBlockError`` once closed); ``close``
        waits until every one has ended, so a file descriptor is never closed (and its
        number reused) under an I/O."""
        with self._lock:
            if self._is_closed:
                raise DiskBlockError(f"disk tier {self.path} is closed")
            self._num_in_flight += 1

    def end_io(self) -> None:
        with self._lock:
            self._num_in_flight -= 1
            if not self._num_in_flight:
                self._idle.notify_all()

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        self.begin_io()
        try:
            yield
        finally:
            self.end_io()

    def _check_io(self, slot: int, block_hash: int | None) -> None:
        if self._is_closed:
            raise DiskBlockError(f"disk tier {self.path} is closed")
        if not 0 <= slot < self.num_slots:
            raise DiskBlockError(f"slot {slot} is out of range (the tier has {self.num_slots})")
        if block_hash is not None and not 0 <= block_hash <= MAX_HASH:
            raise DiskBlockError(f"block hash {block_hash} is not an unsigned 64-bit value")

    def _header_buffer(self) -> np.ndarray:
        buffer = getattr(self._local, "header", None)
        if buffer is None:
            buffer = self._local.header = aligned_array(HEADER_BYTES)
        return buffer

    def io_failure(self, op: str, slot: int, exc: OSError) -> DiskBlockError:
        """Count, log (once per errno) and describe a failed I/O of ``slot``; a failed read's
        block is reported as gone (``is_corrupt``)."""
        self._count("io_errors")
        self._count(f"{op}_failures")
        if exc.errno == errno.ENOSPC:
            self._count("enospc_errors")
        self._forget([slot])
        name = errno.errorcode.get(exc.errno or 0, "?")
        self._log_once(
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
        self._count("corrupt_blocks")
        self._count("read_failures")
        self._forget([slot])
        with self._lock:
            num_corrupt = self._counters["corrupt_blocks"]
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

    def persisted_blocks(self) -> dict[int, int]:
        """Block hash -> slot found on disk at start (verified index entries and headers)."""
        return {block_hash: slot for slot, (block_hash, _) in sorted(self._persisted.items())}

    def stored_blocks(self) -> dict[int, int]:
        """Block hash -> slot of every block this tier holds now."""
        with self._lock:
            items = sorted(self._entries.items())
        return {block_hash: slot for slot, (block_hash, _) in items}

    def record_evicted(self, slot_ids: Iterable[int]) -> None:
        """Forget slots the leader evicted (cheap: memory only; the file follows later)."""
        self._forget(slot_ids)

    def record_cleared(self) -> None:
        with self._lock:
            self._entries.clear()
            self._is_dirty = True

    def _forget(self, slot_ids: Iterable[int]) -> None:
        with self._lock:
            for slot in slot_ids:
                if self._entries.pop(slot, None) is not None:
                    self._is_dirty = True

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
                os.fdatasync(self._fd)  # never list a block the disk may not hold yet
                write_index(self.index_path, self.fingerprint, snapshot)
            except OSError as exc:
                with self._lock:
                    self._is_dirty = True
                self._count("index_flush_errors")
                self._log_once(
                    ("index", exc.errno),
                    logging.ERROR,
                    "kvbm disk tier: cannot write index %s (%s); blocks stay readable but a "
                    "restart will not find them",
                    self.index_path,
                    exc.strerror or exc,
                )
                return False
            self._count("index_flushes")
            return True

    def _is_slots_file_present(self) -> bool:
        """Whether the path still names our open file (not deleted or replaced underneath)."""
        if self._is_file_lost:
            return False
        ours = os.fstat(self._fd)
        try:
            theirs = os.stat(self.path, follow_symlinks=False)
            is_same = (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
        except OSError:
            is_same = False
        if is_same:
            return True
        self._is_file_lost = True
        self._count("file_lost")
        self.index_path.unlink(missing_ok=True)
        log.error(
            "kvbm disk tier: %s was deleted or replaced underneath kvbm; blocks stay readable "
            "from the open file until shutdown but are not persisted (restart to recreate it)",
            self.path,
        )
        return False

    def _flush_loop(self) -> None:
        while True:
            with self._wake:
                if not self._is_closed:
                    self._wake.wait(self._index_flush_secs)
                if self._is_closed:
                    return
            try:
                self.flush_index()
            except Exception:  # the flusher must survive anything; the error is visible here
                log.exception("kvbm disk tier: index flush failed")

    # ------------------------------------------------------------------ misc

    def sync(self) -> None:
        """Make every completed write durable (fdatasync of the slots file)."""
        os.fdatasync(self._fd)

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            snapshot = dict(self._counters)
            snapshot["stored_blocks"] = len(self._entries)
        snapshot["o_direct"] = int(self.is_o_direct)
        return snapshot

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def _log_once(self, key: object, level: int, message: str, *args: object) -> None:
        with self._lock:
            is_first = key not in self._logged
            self._logged.add(key)
        log.log(level if is_first else logging.DEBUG, message, *args)

    def close(self) -> None:
        """Wait for I/O in progress, write the index, close the file; idempotent."""
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            while self._num_in_flight:
                self._idle.wait()
        with self._wake:
            self._wake.notify_all()
        self._flusher.join()
        try:
            self.flush_index()
        finally:
            os.close(self._fd)
            os.close(self._lock_fd)

    def __repr__(self) -> str:
        return f"DiskStorage({self.path}, num_slots={self.num_slots}, o_direct={self.is_o_direct})"


def prepare_directory(path: Path) -> Path:
    """Create ``path`` (0700) if needed and prove it private and writable; ``ConfigError``
    naming what is wrong and the fix otherwise."""
    return ensure_private_dir(path)


def _open_slots_file(path: Path) -> int:
    try:
        fd = open_private_file(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise ConfigError(
            f"cannot open the disk tier file {str(path)!r} ({exc.strerror}); point "
            "KVBM_DISK_CACHE_DIR at a writable directory on a local disk"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(
            f"the disk tier file {str(path)!r} is in use by another process; give each engine "
            "its own KVBM_DISK_CACHE_DIR"
        ) from None
    return fd


def _free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def _no_space_error(directory: Path, need: int, missing: int, free: int) -> ConfigError:
    return ConfigError(
        f"KVBM_DISK_CACHE_DIR={str(directory)!r} has {free} bytes free but the disk tier needs "
        f"{need} bytes ({missing} more than its file already holds); lower KVBM_DISK_CACHE_GB / "
        "KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS or free space"
    )
