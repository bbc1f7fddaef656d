"""The disk tier's index across restarts: what survives, what is detected and ignored."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest

from kvbm_tiers_disk import index_file, journal
from kvbm_tiers_disk.slot_table import SlotTable
from kvbm_tiers_disk.storage import DiskBlockError, DiskStorage


def _open(layout, cache_dir, **kwargs):
    kwargs.setdefault("index_flush_secs", 3600)
    return DiskStorage(layout, kwargs.pop("num_slots", 16), cache_dir, **kwargs)


def on_disk(disk) -> dict[int, int]:
    """Slot -> block hash that the index files say now (snapshot, then its journal)."""
    snapshot = index_file.read_snapshot(disk.index_path, disk.fingerprint)
    assert snapshot is not None
    table = SlotTable(disk.num_slots)
    table.apply_entries(snapshot.entries)
    replay = journal.read_journal(disk.index.journal_path, disk.fingerprint, snapshot.generation)
    if replay is not None:
        table.apply_records(replay.records)
    return {slot: block_hash for block_hash, slot in table.block_map().items()}


def _fill(disk, rows, slots, base=500):
    for slot in slots:
        disk.write_block(slot, base + slot, rows[slot])


def test_blocks_survive_a_restart(layout, cache_dir, rows_of):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {}
    _fill(disk, rows, [0, 3, 7, 15])
    disk.close()

    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks() == {500: 0, 503: 3, 507: 7, 515: 15}
        assert disk.stored_blocks() == disk.persisted_blocks()
        out = np.zeros(layout.bytes_per_block, np.uint8)
        disk.read_block(7, 507, out)
        assert np.array_equal(out, rows[7])
    finally:
        disk.close()


def test_evictions_and_clears_are_persisted(layout, cache_dir, rows_of):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, range(6))
    disk.record_evicted([1, 4])
    disk.close()
    disk = _open(layout, cache_dir)
    assert set(disk.persisted_blocks().values()) == {0, 2, 3, 5}
    disk.record_cleared()
    disk.close()
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {}
    disk.close()


def test_index_is_flushed_in_the_background(layout, cache_dir, rows_of):
    disk = _open(layout, cache_dir, index_flush_secs=0.05)
    try:
        disk.write_block(2, 77, rows_of(1, layout.bytes_per_block)[0])
        deadline = time.monotonic() + 30
        while disk.stats["index_flushes"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert on_disk(disk) == {2: 77}
    finally:
        disk.close()


@pytest.mark.parametrize(
    "damage", ["truncate", "torn_tail", "flip_entry", "flip_header", "garbage", "empty"]
)
def test_damaged_index_is_ignored_and_logged(layout, cache_dir, rows_of, caplog_disk, damage):
    disk = _open(layout, cache_dir)
    _fill(disk, rows_of(16, layout.bytes_per_block), range(8))
    disk.close()
    data = bytearray(disk.index_path.read_bytes())
    if damage == "truncate":
        data = data[:40]
    elif damage == "torn_tail":
        data = data[:-13]
    elif damage == "flip_entry":
        data[40] ^= 1
    elif damage == "flip_header":
        data[20] ^= 1
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    disk.index_path.write_bytes(bytes(data))

    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks() == {}
    finally:
        disk.close()
    assert any("ignoring index" in r.getMessage() for r in caplog_disk.records)


def test_index_of_another_layout_is_ignored(layout, cache_dir, rows_of):
    disk = _open(layout, cache_dir)
    _fill(disk, rows_of(16, layout.bytes_per_block), range(4))
    disk.close()
    other = replace(layout, tokens_per_block=layout.tokens_per_block * 2)
    disk = _open(other, cache_dir)
    try:
        assert disk.persisted_blocks() == {}
        with pytest.raises(DiskBlockError):
            disk.read_block(0, 500, np.zeros(other.bytes_per_block, np.uint8))
    finally:
        disk.close()


def test_index_of_another_world_size_is_ignored(layout, cache_dir, rows_of):
    disk = _open(layout, cache_dir)
    _fill(disk, rows_of(16, layout.bytes_per_block), range(4))
    disk.close()
    disk = _open(layout, cache_dir, world_size=2)
    assert disk.persisted_blocks() == {}
    disk.close()


def _stale_index(layout, cache_dir, rows_of):
    """Slot 0 held block 500 when the index was written; then it was overwritten by block 900
    and the process died before the index caught up (simulated by restoring the old file)."""
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, range(3))
    disk.flush_index()
    saved = {path: cache_dir / f"saved-{path.name}" for path in _index_files(disk)}
    for path, copy in saved.items():
        shutil.copy(path, copy)
    disk.write_block(0, 900, rows[9])
    disk.close()
    for path, copy in saved.items():
        os.replace(copy, path)
    return rows


def _index_files(disk):
    return [disk.index_path, disk.index.journal_path]


def test_stale_index_entry_is_rejected_at_start(layout, cache_dir, rows_of):
    _stale_index(layout, cache_dir, rows_of)
    disk = _open(layout, cache_dir, verify_on_open=True)
    try:
        assert disk.persisted_blocks() == {501: 1, 502: 2}
        assert disk.stats["index_entries_rejected"] == 1
    finally:
        disk.close()


def test_stale_index_never_serves_wrong_bytes_even_unverified(layout, cache_dir, rows_of):
    _stale_index(layout, cache_dir, rows_of)
    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks()[500] == 0  # trusted by default...
        with pytest.raises(DiskBlockError, match="stale"):  # ...but the slot header catches it
            disk.read_block(0, 500, np.zeros(layout.bytes_per_block, np.uint8))
    finally:
        disk.close()


def test_background_verification_drops_stale_entries_after_start(layout, cache_dir, rows_of):
    _stale_index(layout, cache_dir, rows_of)
    disk = _open(layout, cache_dir, verify_in_background=True)
    try:
        assert disk.persisted_blocks() == {500: 0, 501: 1, 502: 2}  # usable at once
        deadline = time.monotonic() + 30
        while disk.stats["index_entries_rejected"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert disk.stats["index_entries_rejected"] == 1
        assert disk.stored_blocks() == {501: 1, 502: 2}
    finally:
        disk.close()
    disk = _open(layout, cache_dir)  # the drop was journaled
    assert disk.persisted_blocks() == {501: 1, 502: 2}
    disk.close()


def test_corrupt_payload_listed_in_index_fails_on_read(layout, cache_dir, rows_of):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, range(2))
    disk.close()
    with open(disk.path, "r+b") as f:
        f.seek(disk.geometry.offset(1) + disk.geometry.stride - disk.geometry.payload_bytes + 5)
        f.write(b"\x00\x01\x02")
    disk = _open(layout, cache_dir, verify_on_open=True)
    try:
        assert disk.persisted_blocks() == {500: 0, 501: 1}  # headers are intact
        with pytest.raises(DiskBlockError, match="checksum"):
            disk.read_block(1, 501, np.zeros(layout.bytes_per_block, np.uint8))
        assert disk.stored_blocks() == {500: 0}
    finally:
        disk.close()
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {500: 0}
    disk.close()


def test_smaller_tier_drops_entries_past_its_end(layout, cache_dir, rows_of):
    disk = _open(layout, cache_dir)
    _fill(disk, rows_of(16, layout.bytes_per_block), [1, 9, 14])
    disk.close()
    disk = _open(layout, cache_dir, num_slots=10)
    try:
        assert disk.persisted_blocks() == {501: 1, 509: 9}
        assert disk.path.stat().st_size == 10 * disk.geometry.stride
    finally:
        disk.close()


def test_failed_journal_append_is_retried(layout, cache_dir, rows_of, monkeypatch, caplog_disk):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, range(2))
    assert disk.flush_index()
    before = disk.index.journal_path.read_bytes()
    disk.write_block(5, 505, rows[5])

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", fail)
    assert not disk.flush_index()
    assert disk.index.journal_path.read_bytes() == before  # nothing torn left behind
    assert disk.stats["index_flush_errors"] == 1
    monkeypatch.undo()
    disk.close()  # retried on close
    assert any("cannot write index" in r.getMessage() for r in caplog_disk.records)
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {500: 0, 501: 1, 505: 5}
    disk.close()


def test_failed_compaction_keeps_the_old_files(layout, cache_dir, rows_of, monkeypatch):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, range(2))
    assert disk.flush_index()
    before = [path.read_bytes() for path in _index_files(disk)]
    disk.record_cleared()  # a clear is written as a new, empty snapshot
    _fill(disk, rows, [7])

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    assert not disk.flush_index()
    assert [path.read_bytes() for path in _index_files(disk)] == before
    assert not list(cache_dir.glob("*.tmp-*"))  # the temp file is cleaned up
    monkeypatch.undo()
    disk.close()  # retried on close
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {507: 7}
    disk.close()


def test_temp_file_of_a_crashed_flush_is_ignored_and_removed(layout, cache_dir, rows_of):
    disk = _open(layout, cache_dir)
    _fill(disk, rows_of(16, layout.bytes_per_block), range(2))
    disk.close()
    leftover = disk.index_path.with_name(disk.index_path.name + ".tmp-99999")
    leftover.write_bytes(b"half a flush")
    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks() == {500: 0, 501: 1}
        assert not leftover.exists()
    finally:
        disk.close()


def test_snapshot_encoding_round_trips():
    entries = np.array([(0, 5, 2**63), (3, 2**64 - 1, 12)], index_file.ENTRY_DTYPE)
    data = index_file.encode_snapshot(123, 9, entries)
    snapshot = index_file.decode_snapshot(data, 123)
    assert snapshot.generation == 9 and not snapshot.is_migrated
    assert snapshot.entries.tolist() == entries.tolist()
    with pytest.raises(ValueError, match="another layout"):
        index_file.decode_snapshot(data, 124)
