"""The disk tier's index journal: what changed since the snapshot, appended once per flush.

Runs in each worker process; the persistent index calls it under its flush lock. Operations:
- ``read_journal(path, fingerprint, generation)``: the ``Replay`` of a journal continuing the
  snapshot of ``generation``: its records up to the first batch that is torn or damaged and
  the length of that good prefix; ``None`` (logged) when the file is missing, of another
  layout, of another generation (a journal a compaction replaced: the snapshot holds what it
  said) or unreadable. A file another user could have changed is refused (``ConfigError``).
- ``create_journal(path, fingerprint, generation)``: replace the file with an empty journal,
  crash-safely (as the snapshot is written); ``JournalWriter``.
- ``JournalWriter.open(path, length)``: append to an existing journal after cutting it to
  ``length`` (a torn tail left by a crash). ``append(records)``: one batch, then fdatasync;
  ``OSError`` on failure, after which the file is cut back to its last good batch, so a
  partial batch is never followed by good ones. ``num_bytes``; ``close()``.

File (little endian)::

    magic        8s  b"KVBMJNL2"
    version      u32 JOURNAL_VERSION (2, the index format it goes with)
    reserved     u32 0
    fingerprint  u64 layout fingerprint of the slots file
    generation   u64 the snapshot it continues
    head_checksum u64 xxh3_64 of the 32 bytes before it
    then batches, each:
    num_records  u32
    marker       4s  b"KJB2"
    checksum     u64 xxh3_64 (seeded with the generation) of num_records, marker and records
    records      num_records x (slot u64, block_hash u64, checksum u64)

A record states a slot's content: stored (``block_hash``, payload ``checksum``) or, with
``REMOVED`` set in ``slot``, empty. A slot appears at most once per batch; later records win.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from kvbm_core.private_dir import open_private_file
from kvbm_tiers_disk.index_file import ENTRY_DTYPE, read_private, replace_file

__all__ = [
    "JOURNAL_VERSION",
    "RECORD_DTYPE",
    "REMOVED",
    "Replay",
    "read_journal",
    "create_journal",
    "JournalWriter",
]

log = logging.getLogger(__name__)

JOURNAL_VERSION = 2
REMOVED = 1 << 63
RECORD_DTYPE = ENTRY_DTYPE
_MAGIC = b"KVBMJNL2"
_HEAD = struct.Struct("<8sIIQQ")
_HEAD_CHECKSUM = struct.Struct("<Q")
HEAD_BYTES = _HEAD.size + _HEAD_CHECKSUM.size
_FRAME = struct.Struct("<I4sQ")
_MARKER = b"KJB2"


@dataclass(frozen=True)
class Replay:
    records: np.ndarray  # RECORD_DTYPE, in the order written
    good_bytes: int  # length of the intact prefix; what follows is a torn or damaged tail
    num_bytes: int  # length of the file as found


def encode_head(fingerprint: int, generation: int) -> bytes:
    head = _HEAD.pack(_MAGIC, JOURNAL_VERSION, 0, fingerprint, generation)
    return head + _HEAD_CHECKSUM.pack(xxhash.xxh3_64_intdigest(head))


def encode_batch(generation: int, records: np.ndarray) -> bytes:
    body = np.ascontiguousarray(records, dtype=RECORD_DTYPE).tobytes()
    prefix = struct.pack("<I4s", len(records), _MARKER)
    checksum = xxhash.xxh3_64_intdigest(prefix + body, seed=generation)
    return _FRAME.pack(len(records), _MARKER, checksum) + body


def decode_journal(data: bytes, fingerprint: int, generation: int) -> Replay:
    """The intact records of ``data``; ``ValueError`` when its head does not continue the
    snapshot of ``generation`` on this layout."""
    if len(data) < HEAD_BYTES:
        raise ValueError(f"truncated head ({len(data)} bytes)")
    head = data[: _HEAD.size]
    (stored,) = _HEAD_CHECKSUM.unpack_from(data, _HEAD.size)
    if stored != xxhash.xxh3_64_intdigest(head):
        raise ValueError("damaged head")
    magic, version, _reserved, file_fingerprint, file_generation = _HEAD.unpack(head)
    if magic != _MAGIC or version != JOURNAL_VERSION:
        raise ValueError(f"not a kvbm disk index journal of version {JOURNAL_VERSION}")
    if file_fingerprint != fingerprint:
        raise ValueError("written for another layout, rank or world size")
    if file_generation != generation:
        raise ValueError(f"generation {file_generation} does not continue snapshot {generation}")
    pieces, offset = [], HEAD_BYTES
    # One Python step per batch (one per flush): the records themselves are checked by one
    # hash call per batch and applied as arrays.
    while offset + _FRAME.size <= len(data):
        num_records, marker, checksum = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + num_records * RECORD_DTYPE.itemsize
        if marker != _MARKER or end > len(data):
            break
        covered = data[offset : offset + 8] + data[offset + _FRAME.size : end]
        if xxhash.xxh3_64_intdigest(covered, seed=generation) != checksum:
            break
        pieces.append(np.frombuffer(data, RECORD_DTYPE, num_records, offset + _FRAME.size))
        offset = end
    records = np.concatenate(pieces) if pieces else np.empty(0, RECORD_DTYPE)
    return Replay(records, offset, len(data))


def read_journal(path: Path, fingerprint: int, generation: int) -> Replay | None:
    try:
        data = read_private(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("kvbm disk tier: cannot read index journal %s (%s); ignoring it", path, exc)
        return None
    try:
        replay = decode_journal(data, fingerprint, generation)
    except ValueError as exc:
        log.warning("kvbm disk tier: ignoring index journal %s: %s", path, exc)
        return None
    if replay.good_bytes < replay.num_bytes:
        log.warning(
            "kvbm disk tier: index journal %s ends in %d bytes of a torn or damaged batch "
            "(a crash while flushing); kept the %d records before it and cut the rest",
            path,
            replay.num_bytes - replay.good_bytes,
            len(replay.records),
        )
    return replay


def create_journal(path: Path, fingerprint: int, generation: int) -> JournalWriter:
    """Replace ``path`` with an empty journal continuing snapshot ``generation``."""
    replace_file(path, encode_head(fingerprint, generation))
    return JournalWriter.open(path, generation, HEAD_BYTES)


class JournalWriter:
    def __init__(self, fd: int, generation: int, num_bytes: int) -> None:
        self._fd = fd
        self.generation = generation
        self.num_bytes = num_bytes

    @classmethod
    def open(cls, path: Path, generation: int, length: int) -> JournalWriter:
        """Append to ``path`` after cutting it to its first ``length`` bytes."""
        fd = open_private_file(path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size != length:
                os.ftruncate(fd, length)
                os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, generation, length)

    def append(self, records: np.ndarray) -> None:
        """Append one batch durably; ``OSError`` (the file cut back to before it) otherwise."""
        data = memoryview(encode_batch(self.generation, records))
        offset = self.num_bytes
        try:
            while data:
                done = os.pwrite(self._fd, data, offset)
                data, offset = data[done:], offset + done
            os.fdatasync(self._fd)
        except OSError:
            # Failing that, the torn batch is cut at the next start, and the next append
            # overwrites it (it writes at num_bytes), so no good batch ever follows it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.num_bytes)
            raise
        self.num_bytes = offset

    def close(self) -> None:
        os.close(self._fd)
