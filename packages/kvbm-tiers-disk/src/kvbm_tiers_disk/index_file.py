"""The disk tier's persistent index: which slot holds which block, across restarts.

Operations (worker process):
- ``write_index(path, fingerprint, entries)``: replace the file crash-safely (temp file in the
  same directory, fsync, ``os.replace``, fsync of the directory). A crash at any point leaves
  either the old file or the new one, never a mix.
- ``read_index(path, fingerprint)``: the entries, or ``None`` with the reason logged when the
  file is missing, torn, truncated, damaged, of another format version or of another layout.
  Nothing in a rejected file is trusted. A file another user could have changed (not ours,
  writable by others, a symbolic or hard link) is refused with ``ConfigError``.

File (little endian)::

    magic       8s  b"KVBMIDX1"
    version     u32 FORMAT_VERSION
    reserved    u32 0
    fingerprint u64 layout fingerprint of the slots file it describes
    num_entries u64
    entries     num_entries x (slot u64, block_hash u64, checksum u64), sorted by slot
    file_checksum u64  xxh3_64 of every byte before it

The index is a hint, not the authority: every slot carries its own header and checksum, so an
index that is older than the slots file can cost a failed load, never a wrong byte.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np
import xxhash

from kvbm_core.private_dir import open_private_file
from kvbm_tiers_disk.slot_format import FORMAT_VERSION

__all__ = ["IndexEntries", "write_index", "read_index", "ENTRY_DTYPE"]

log = logging.getLogger(__name__)

IndexEntries = dict[int, tuple[int, int]]
"""slot -> (block hash, payload checksum)."""

_MAGIC = b"KVBMIDX1"
_HEAD = struct.Struct("<8sIIQQ")
_TRAILER = struct.Struct("<Q")
ENTRY_DTYPE = np.dtype([("slot", "<u8"), ("block_hash", "<u8"), ("checksum", "<u8")])


def encode_index(fingerprint: int, entries: IndexEntries) -> bytes:
    table = np.empty(len(entries), dtype=ENTRY_DTYPE)
    for i, slot in enumerate(sorted(entries)):
        table[i] = (slot, *entries[slot])
    body = _HEAD.pack(_MAGIC, FORMAT_VERSION, 0, fingerprint, len(entries)) + table.tobytes()
    return body + _TRAILER.pack(xxhash.xxh3_64_intdigest(body))


def write_index(path: Path, fingerprint: int, entries: IndexEntries) -> None:
    """Replace ``path`` with ``entries``; raises ``OSError`` and leaves the old file on failure."""
    data = encode_index(fingerprint, entries)
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


def decode_index(data: bytes, fingerprint: int) -> IndexEntries:
    """The entries in ``data``; ``ValueError`` saying what is wrong with it otherwise."""
    if len(data) < _HEAD.size + _TRAILER.size:
        raise ValueError(f"truncated ({len(data)} bytes)")
    body, trailer = data[: -_TRAILER.size], data[-_TRAILER.size :]
    magic, version, _reserved, file_fingerprint, num_entries = _HEAD.unpack(body[: _HEAD.size])
    if magic != _MAGIC:
        raise ValueError("not a kvbm disk index (bad magic)")
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version}, this kvbm reads {FORMAT_VERSION}")
    if len(body) != _HEAD.size + num_entries * ENTRY_DTYPE.itemsize:
        raise ValueError(f"torn or truncated: {len(data)} bytes for {num_entries} entries")
    if _TRAILER.unpack(trailer)[0] != xxhash.xxh3_64_intdigest(body):
        raise ValueError("checksum mismatch (damaged or torn)")
    if file_fingerprint != fingerprint:
        raise ValueError("written for another layout, rank or world size")
    table = np.frombuffer(body, dtype=ENTRY_DTYPE, offset=_HEAD.size)
    return {int(s): (int(h), int(c)) for s, h, c in table.tolist()}


def _read_private(path: Path) -> bytes:
    fd = open_private_file(path, os.O_RDONLY)
    try:
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


def read_index(path: Path, fingerprint: int) -> IndexEntries | None:
    try:
        data = _read_private(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("kvbm disk tier: cannot read index %s (%s); starting empty", path, exc)
        return None
    try:
        return decode_index(data, fingerprint)
    except ValueError as exc:
        log.warning("kvbm disk tier: ignoring index %s: %s; starting empty", path, exc)
        return None
