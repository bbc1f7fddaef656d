"""One rank's slots file of the disk tier: opened safely, preallocated, one slot per I/O.

Runs in each worker process, any thread unless said otherwise. Operations:
- ``SlotsFile(directory, rank, geometry, num_slots, fingerprint, ...)``: check the directory
  (creatable, writable, private to this user: see ``kvbm_core.private_dir``), open or create
  ``kvbm-disk-rank<r>.slots`` (0600, never through a link, refused when another user could
  change it), lock it against a second process, preallocate ``num_slots`` slots (enough free
  space, or ``ConfigError`` naming the directory, the bytes needed and the bytes free) and open
  it with O_DIRECT when the filesystem allows (a fallback is logged once).
- ``write(slot, buffer)`` / ``read(slot, buffer)``: one I/O of ``io_bytes`` (header and payload
  contiguous) at the slot's offset; the bytes moved, or ``OSError``. At most ``io_depth`` at a
  time, each between ``begin_io`` and ``end_io``.
- ``seal(slot, block_hash, buffer)``: put the slot header in front of the payload at
  ``buffer[HEADER_BYTES:]``; the payload checksum. ``check(slot, block_hash, buffer, num_read)``:
  the verified payload (header: slot, block hash, layout; then the checksum), or ``ValueError``
  naming what is wrong. ``is_header_valid(slot, block_hash, checksum)``: one header read and
  checked (how the index is verified at start).
- ``is_present()``: whether the path still names the open file; ``sync()``: fdatasync.
- ``begin_close()``: refuse new I/O and wait for what is in flight (False when already
  closed); ``close()``: close the descriptors.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from kvbm_core.config import ConfigError
from kvbm_core.private_dir import ensure_private_dir, open_private_file
from kvbm_tiers_disk.buffers import aligned_array, as_buffer
from kvbm_tiers_disk.errors import DiskBlockError
from kvbm_tiers_disk.slot_format import (
    ALIGN,
    HEADER_BYTES,
    SlotGeometry,
    SlotHeader,
    check_header,
    pack_header,
    payload_checksum,
)

__all__ = ["SlotsFile", "prepare_directory", "closed_on_failure"]

log = logging.getLogger(__name__)


class SlotsFile:
    def __init__(
        self,
        directory: Path,
        rank: int,
        geometry: SlotGeometry,
        num_slots: int,
        fingerprint: int,
        *,
        use_o_direct: bool = True,
        io_depth: int | None = None,
    ) -> None:
        self.directory = prepare_directory(directory)
        self.path = self.directory / f"kvbm-disk-rank{rank}.slots"
        self.geometry = geometry
        self.num_slots = num_slots
        self.fingerprint = fingerprint
        self.is_closed = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._num_in_flight = 0
        self._local = threading.local()
        # Some devices (virtio disks backed by a file) serve one large request at a time
        # fastest; io_depth caps the syscalls in flight while hashing and copying overlap.
        self._io_gate = threading.BoundedSemaphore(io_depth) if io_depth else nullcontext()
        self._lock_fd = _open_locked(self.path)
        with closed_on_failure(lambda: os.close(self._lock_fd), self.path):
            self._size_file()
            self.fd, self.is_o_direct = self._open_io_fd(use_o_direct)

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
                    os.preadv(fd, [as_buffer(aligned_array(ALIGN))], 0)
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

    # ------------------------------------------------------------------ slot I/O

    @property
    def io_bytes(self) -> int:
        """Bytes one slot I/O moves (from the slot's start)."""
        # O_DIRECT moves whole 4 KiB pages; buffered I/O stops at the block's last byte.
        if self.is_o_direct:
            return self.geometry.stride
        return HEADER_BYTES + self.geometry.bytes_per_block

    def write(self, slot: int, buffer: np.ndarray) -> int:
        """Write ``buffer[:io_bytes]`` at ``slot``; the bytes written (``OSError`` on failure)."""
        io_bytes = self.io_bytes
        with self._in_flight(), self._io_gate:
            return os.pwritev(self.fd, [as_buffer(buffer[:io_bytes])], self.geometry.offset(slot))

    def read(self, slot: int, buffer: np.ndarray) -> int:
        """Read ``slot`` into ``buffer[:io_bytes]``; the bytes read (``OSError`` on failure)."""
        io_bytes = self.io_bytes
        with self._in_flight(), self._io_gate:
            return os.preadv(self.fd, [as_buffer(buffer[:io_bytes])], self.geometry.offset(slot))

    def begin_io(self) -> None:
        """Mark an I/O on the file in progress (``DiskBlockError`` once closed); closing
        waits until every one has ended, so a file descriptor is never closed (and its
        number reused) under an I/O."""
        with self._lock:
            if self.is_closed:
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

    # ------------------------------------------------------------------ headers

    def seal(self, slot: int, block_hash: int | None, buffer: np.ndarray) -> int:
        """Put the header of the payload at ``buffer[HEADER_BYTES:]`` in front of it; the
        payload checksum. A block without a hash (``None``) is stored under hash 0."""
        num_bytes = self.geometry.bytes_per_block
        checksum = payload_checksum(as_buffer(buffer[HEADER_BYTES : HEADER_BYTES + num_bytes]))
        header = SlotHeader(self.fingerprint, slot, block_hash or 0, num_bytes, checksum)
        buffer[:HEADER_BYTES] = 0
        pack_header(header, memoryview(as_buffer(buffer[:HEADER_BYTES])))
        return checksum

    def check(
        self, slot: int, block_hash: int | None, buffer: np.ndarray, num_read: int
    ) -> np.ndarray:
        """The verified payload (a view) of a slot buffer holding ``num_read`` bytes read from
        ``slot``; ``ValueError`` saying why the bytes are not that block otherwise."""
        num_bytes = self.geometry.bytes_per_block
        if num_read < HEADER_BYTES + num_bytes:
            raise ValueError(f"short read ({num_read} bytes; file truncated?)")
        stored = self._check_header(buffer[:HEADER_BYTES], slot, block_hash)
        payload = buffer[HEADER_BYTES : HEADER_BYTES + num_bytes]
        if payload_checksum(as_buffer(payload)) != stored.checksum:
            raise ValueError("payload checksum mismatch")
        return payload

    def is_header_valid(self, slot: int, block_hash: int, checksum: int) -> bool:
        """Whether ``slot``'s header names ``block_hash`` with payload checksum ``checksum``."""
        raw = self._header_buffer()
        try:
            if os.preadv(self.fd, [as_buffer(raw)], self.geometry.offset(slot)) != HEADER_BYTES:
                return False
            header = self._check_header(raw, slot, block_hash)
        except (OSError, ValueError):
            return False
        return header.checksum == checksum

    def _check_header(self, raw: np.ndarray, slot: int, block_hash: int | None) -> SlotHeader:
        return check_header(
            raw,
            fingerprint=self.fingerprint,
            slot=slot,
            num_bytes=self.geometry.bytes_per_block,
            block_hash=block_hash,
        )

    def _header_buffer(self) -> np.ndarray:
        buffer = getattr(self._local, "header", None)
        if buffer is None:
            buffer = self._local.header = aligned_array(HEADER_BYTES)
        return buffer

    # ------------------------------------------------------------------ the file itself

    def is_present(self) -> bool:
        """Whether the path still names our open file (not deleted or replaced underneath)."""
        ours = os.fstat(self.fd)
        try:
            theirs = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

    def sync(self) -> None:
        """Make every completed write durable (fdatasync)."""
        os.fdatasync(self.fd)

    def begin_close(self) -> bool:
        """Refuse new I/O and wait for I/O in progress; False when already closed."""
        with self._lock:
            if self.is_closed:
                return False
            self.is_closed = True
            while self._num_in_flight:
                self._idle.wait()
        return True

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._lock_fd)


def prepare_directory(path: Path) -> Path:
    """Create ``path`` (0700) if needed and prove it private and writable; ``ConfigError``
    naming what is wrong and the fix otherwise."""
    return ensure_private_dir(path)


@contextmanager
def closed_on_failure(close: Callable[[], None], path: Path) -> Iterator[None]:
    """Call ``close`` when the block raises; an ``OSError`` becomes a ``ConfigError`` naming
    the tier file ``path`` and the fix."""
    try:
        yield
    except BaseException as exc:
        close()
        if isinstance(exc, OSError):
            raise ConfigError(
                f"cannot prepare the disk tier file {str(path)!r} ({exc.strerror or exc}); "
                "point KVBM_DISK_CACHE_DIR at a writable directory on a local disk"
            ) from None
        raise


def _open_locked(path: Path) -> int:
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
