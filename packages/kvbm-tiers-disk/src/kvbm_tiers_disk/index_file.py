"""The disk tier's index snapshot: which slot held which block at the last compaction.

Operations (worker process):
- ``write_snapshot(path, fingerprint, generation, entries)``: replace the file crash-safely
  (temp file in the same directory, fsync, ``os.replace``, fsync of the directory). A crash at
  any point leaves either the old file or the new one, never a mix.
- ``read_snapshot(path, fingerprint)``: the ``Snapshot``, or ``None`` with the reason logged
  when the file is missing, torn, truncated, damaged, of an unknown format version or of
  another layout. Nothing in a rejected file is trusted: the tier starts empty and the next
  flush writes a fresh snapshot, so the slots it listed are never served from it. A file of
  the previous release (``KVBMIDX1``, version 1: the whole index, rewritten on every flush)
  is read and marked ``is_migrated``. A file another user could have changed (not ours,
  writable by others, a symbolic or hard link) is refused with ``ConfigError``.

What changed since the snapshot is in the journal (:mod:`kvbm_tiers_disk.journal`) of the same
``generation``.

File (little endian)::

    magic       8s  b"KVBMIDX2"
    version     u32 INDEX_VERSION (2)
    reserved    u32 0
    fingerprint u64 layout fingerprint of the slots file it describes
    generation  u64 which journal continues it
    num_entries u64
    entries     num_entries x (slot u64, block_hash u64, checksum u64), sorted by slot
    file_checksum u64  xxh3_64 of every byte before it

Version 1 had no generation field (magic ``KVBMIDX1``, version u32 1, reserved, fingerprint,
num_entries, entries, checksum). The index is a hint, not the authority: every slot carries
its own header and checksum, so an index that is older than the slots file can cost a failed
load, never a wrong byte.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from kvbm_core.private_dir import open_private_file

__all__ = [
    "ENTRY_DTYPE",
    "INDEX_VERSION",
    "Snapshot",
    "encode_snapshot",
    "decode_snapshot",
    "write_snapshot",
    "read_snapshot",
    "replace_file",
    "read_private",
]

log = logging.getLogger(__name__)

INDEX_VERSION = 2
_MAGIC = b"KVBMIDX2"
_MAGIC_V1 = b"KVBMIDX1"
_HEAD = struct.Struct("<8sIIQQQ")
_HEAD_V1 = struct.Struct("<8sIIQQ")
_TRAILER = struct.Struct("<Q")
ENTRY_DTYPE = np.dtype([("slot", "<u8"), ("block_hash", "<u8"), ("checksum", "<u8")])


@dataclass(frozen=True)
class Snapshot:
    generation: int
    entries: np.ndarray  # ENTRY_DTYPE, sorted by slot
    is_migrated: bool = False  # read from the previous release's format


def encode_snapshot(fingerprint: int, generation: int, entries: np.ndarray) -> bytes:
    head = _HEAD.pack(_MAGIC, INDEX_VERSION, 0, fingerprint, generation, len(entries))
    body = head + np.ascontiguousarray(entries, dtype=ENTRY_DTYPE).tobytes()
    return body + _TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def decode_snapshot(data: bytes, fingerprint: int) -> Snapshot:
    """The snapshot in ``data``; ``ValueError`` saying what is wrong with it otherwise."""
    if len(data) < _HEAD_V1.size + _TRAILER.size:
        raise ValueError(f"truncated ({len(data)} bytes)")
    magic, version = struct.unpack_from("<8sI", data)
    if magic == _MAGIC_V1 and version == 1:
        head, is_migrated = _HEAD_V1, True
    elif magic == _MAGIC and version == INDEX_VERSION:
        head, is_migrated = _HEAD, False
    elif magic[:7] == _MAGIC[:7]:
        raise ValueError(
            f"index format version {version} ({magic!r}) is not one this kvbm reads (1, 2); "
            "written by another kvbm release, its blocks are not served and the tier starts "
            "empty (the slots are overwritten as blocks are stored)"
        )
    else:
        raise ValueError("not a kvbm disk index (bad magic)")
    if len(data) < head.size + _TRAILER.size:
        raise ValueError(f"truncated ({len(data)} bytes)")
    body, trailer = data[: -_TRAILER.size], data[-_TRAILER.size :]
    fields = head.unpack_from(body)
    file_fingerprint, num_entries = fields[3], fields[-1]
    generation = 0 if is_migrated else fields[4]
    if len(body) != head.size + num_entries * ENTRY_DTYPE.itemsize:
        raise ValueError(f"torn or truncated: {len(data)} bytes for {num_entries} entries")
    if _TRAILER.unpack(trailer)[0] != xxhash.xxh3_64_intdigest(body):
        raise ValueError("checksum mismatch (damaged or torn)")
    if file_fingerprint != fingerprint:
        raise ValueError("written for another layout, rank or world size")
    entries = np.frombuffer(body, dtype=ENTRY_DTYPE, offset=head.size)
    return Snapshot(generation, entries, is_migrated)


def write_snapshot(path: Path, fingerprint: int, generation: int, entries: np.ndarray) -> None:
    """Replace ``path``; raises ``OSError`` and leaves the old file on failure."""
    replace_file(path, encode_snapshot(fingerprint, generation, entries))


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (``OSError``: old file kept)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # O_EXCL: never write through a link left at that name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def read_private(path: Path) -> bytes:
    """The bytes of a file only this user can change (``ConfigError`` otherwise)."""
    fd = open_private_file(path, os.O_RDONLY)
    try:
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


def read_snapshot(path: Path, fingerprint: int) -> Snapshot | None:
    try:
        data = read_private(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("kvbm disk tier: cannot read index %s (%s); starting empty", path, exc)
        return None
    try:
        snapshot = decode_snapshot(data, fingerprint)
    except ValueError as exc:
        log.warning("kvbm disk tier: ignoring index %s: %s; starting empty", path, exc)
        return None
    if snapshot.is_migrated:
        log.info("kvbm disk tier: migrating index %s from format version 1", path)
    return snapshot
