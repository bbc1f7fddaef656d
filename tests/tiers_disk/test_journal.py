"""The disk index's journal and snapshot: incremental durability, torn tails, compaction,
generations and the format of the previous release."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import xxhash

from kvbm_tiers_disk import index_file
from kvbm_tiers_disk.slot_table import BlockMap, SlotTable
from kvbm_tiers_disk.storage import DiskBlockError, DiskStorage

from .test_persistence import on_disk


def _open(layout, cache_dir, **kwargs):
    kwargs.setdefault("index_flush_secs", 3600)
    return DiskStorage(layout, 16, cache_dir, **kwargs)


def _fill(disk, rows, slots, base=500):
    for slot in slots:
        disk.write_block(slot, base + slot, rows[slot])


def test_a_store_is_durable_by_an_append_without_rewriting_the_snapshot(
    layout, cache_dir, rows_of, tmp_path
):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, range(3))
    assert disk.flush_index()
    snapshot = disk.index_path.read_bytes()
    journal_bytes = disk.index.journal_path.stat().st_size
    disk.write_block(9, 909, rows[9])
    disk.record_evicted([1])
    assert disk.flush_index()
    assert disk.index_path.read_bytes() == snapshot
    assert disk.index.journal_path.stat().st_size > journal_bytes
    # A crash now (nothing closed): a copy of the files is what a restart finds.
    crashed = tmp_path / "crashed"
    shutil.copytree(cache_dir, crashed)
    disk.close()
    disk = _open(layout, crashed)
    try:
        assert disk.persisted_blocks() == {500: 0, 502: 2, 909: 9}
        out = np.zeros(layout.bytes_per_block, np.uint8)
        disk.read_block(9, 909, out)
        assert np.array_equal(out, rows[9])
    finally:
        disk.close()


def test_a_torn_journal_tail_is_cut_and_what_precedes_it_kept(
    layout, cache_dir, rows_of, caplog_disk
):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, range(2))
    disk.flush_index()
    _fill(disk, rows, [4])
    disk.flush_index()
    good = disk.index.journal_path.stat().st_size
    _fill(disk, rows, [6, 7])
    disk.close()
    path = disk.index.journal_path
    path.write_bytes(path.read_bytes()[:-5])  # the last batch was being written
    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks() == {500: 0, 501: 1, 504: 4}
        assert path.stat().st_size == good
        _fill(disk, rows, [8])  # appended after the cut, found again
    finally:
        disk.close()
    assert any("torn or damaged batch" in r.getMessage() for r in caplog_disk.records)
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {500: 0, 501: 1, 504: 4, 508: 8}
    disk.close()


def test_a_damaged_batch_ends_the_replay(layout, cache_dir, rows_of):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, [0])
    disk.flush_index()  # the first flush writes the snapshot
    first = disk.index.journal_path.stat().st_size
    for slot in (2, 3):
        _fill(disk, rows, [slot])
        disk.flush_index()
    disk.close()
    data = bytearray(disk.index.journal_path.read_bytes())
    data[first + 20] ^= 0x40  # a bit flip inside the first batch's records
    disk.index.journal_path.write_bytes(bytes(data))
    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks() == {500: 0}  # nor what followed the damaged batch
    finally:
        disk.close()


def test_the_journal_is_compacted_once_it_outgrows_its_bound(layout, cache_dir, rows_of):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir, index_compact_bytes=200)
    expected = {}
    try:
        for round_ in range(40):
            slot = round_ % 16
            disk.write_block(slot, 1000 + round_, rows[slot])
            expected[slot] = 1000 + round_
            assert disk.flush_index()
            # bound: the larger of 200 bytes and the snapshot, plus the batch that crossed it
            assert disk.index.journal_path.stat().st_size <= 16 * 24 + 40 + 40
        assert disk.stats["index_compactions"] >= 3
        assert on_disk(disk) == expected
    finally:
        disk.close()
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {block_hash: slot for slot, block_hash in expected.items()}
    disk.close()


def test_a_journal_of_the_previous_generation_is_ignored(layout, cache_dir, rows_of, caplog_disk):
    """A crash between a compaction's snapshot and its new journal: the old journal is left,
    and the snapshot already holds what it said."""
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, range(2))
    disk.flush_index()
    _fill(disk, rows, [5])
    disk.flush_index()
    old_journal = disk.index.journal_path.read_bytes()
    disk.record_evicted([0])
    disk.record_cleared()  # compacts
    _fill(disk, rows, [3])
    disk.close()
    disk.index.journal_path.write_bytes(old_journal)
    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks() == {503: 3}  # the snapshot, not the old journal
    finally:
        disk.close()
    assert any("does not continue snapshot" in r.getMessage() for r in caplog_disk.records)


def _encode_v1(fingerprint: int, entries: np.ndarray) -> bytes:
    """The index file of the previous release (format version 1), byte for byte."""
    body = struct.pack("<8sIIQQ", b"KVBMIDX1", 1, 0, fingerprint, len(entries))
    body += entries.tobytes()
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def test_an_index_of_the_previous_release_is_migrated(layout, cache_dir, rows_of, caplog_disk):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, [1, 4])
    disk.close()
    snapshot = index_file.read_snapshot(disk.index_path, disk.fingerprint)
    assert snapshot is not None and len(snapshot.entries) == 2  # the first flush compacts
    entries = snapshot.entries.copy()
    disk.index.journal_path.unlink()
    disk.index_path.write_bytes(_encode_v1(disk.fingerprint, entries))
    disk = _open(layout, cache_dir, verify_on_open=True)  # the checksums were carried over
    try:
        assert disk.persisted_blocks() == {501: 1, 504: 4}
        assert disk.stats["index_entries_rejected"] == 0
        out = np.zeros(layout.bytes_per_block, np.uint8)
        disk.read_block(4, 504, out)
        assert np.array_equal(out, rows[4])
    finally:
        disk.close()
    assert disk.index_path.read_bytes()[:8] == b"KVBMIDX2"  # rewritten in the new format
    assert any("migrating index" in r.getMessage() for r in caplog_disk.records)
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {501: 1, 504: 4}
    disk.close()


def test_an_index_of_an_unknown_version_is_refused_and_nothing_served(
    layout, cache_dir, rows_of, caplog_disk
):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, [1, 4])
    disk.close()
    body = bytearray(disk.index_path.read_bytes()[:-8])
    body[8:12] = struct.pack("<I", 3)
    disk.index_path.write_bytes(bytes(body) + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks() == {}
        assert disk.stored_blocks() == {}
        with pytest.raises(DiskBlockError):  # a stale leader naming another block is refused
            disk.read_block(1, 999, np.zeros(layout.bytes_per_block, np.uint8))
    finally:
        disk.close()
    messages = [r.getMessage() for r in caplog_disk.records]
    assert any("format version 3" in m and "starts empty" in m for m in messages)
    assert disk.index_path.read_bytes()[:8] == b"KVBMIDX2"  # reset to an empty, current index
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {}
    disk.close()


def test_block_map_is_a_compact_read_only_mapping():
    slot_ids = np.array([1, 2, 4, 7])
    hashes = np.array([10, 2**64 - 1, 30, 30], np.uint64)
    blocks = BlockMap.from_slots(slot_ids, hashes)
    assert blocks == {10: 1, 30: 7, 2**64 - 1: 2}  # a hash stored twice: its highest slot
    assert dict(blocks.items()) == {10: 1, 30: 7, 2**64 - 1: 2}
    assert len(blocks) == 3 and list(blocks) == [10, 30, 2**64 - 1]
    assert blocks.get(11) is None and 30 in blocks and -1 not in blocks and "x" not in blocks
    assert blocks.nbytes == 3 * 12
    assert BlockMap.from_slots(np.array([], np.int64), np.array([], np.uint64)) == {}


def test_slot_table_replays_records_in_order():
    table = SlotTable(8)
    table.store(1, 11, 111)
    table.store(2, 22, 222)
    first = table.take_changes()
    table.remove(1)
    table.store(2, 23, 223)
    table.store(7, 77, 777)
    second = table.take_changes()
    assert table.take_changes().size == 0
    replayed = SlotTable(8)
    assert replayed.apply_records(np.concatenate([first, second])) == 0
    assert dict(replayed.block_map().items()) == {23: 2, 77: 7}
    assert dict(replayed.block_map().items()) == dict(table.block_map().items())
    assert replayed.checksums[2] == 223
    assert replayed.num_stored == table.num_stored == 2
    smaller = SlotTable(4)
    assert smaller.apply_records(np.concatenate([first, second])) == 1  # slot 7 is past it
    assert dict(smaller.block_map().items()) == {23: 2}


def test_a_journal_without_its_snapshot_never_continues_a_new_one(layout, cache_dir, rows_of):
    rows = rows_of(16, layout.bytes_per_block)
    disk = _open(layout, cache_dir)
    _fill(disk, rows, [0])
    disk.flush_index()
    _fill(disk, rows, [1, 2])
    disk.close()
    orphan = disk.index.journal_path.read_bytes()
    disk.index_path.unlink()  # the snapshot is lost; its journal stays
    disk = _open(layout, cache_dir)
    assert disk.persisted_blocks() == {}  # a journal alone is not trusted
    _fill(disk, rows, [5])
    disk.close()  # compacts: a new snapshot and journal
    disk.index.journal_path.write_bytes(orphan)  # as if the crash came between the two
    disk = _open(layout, cache_dir)
    try:
        assert disk.persisted_blocks() == {505: 5}
    finally:
        disk.close()
