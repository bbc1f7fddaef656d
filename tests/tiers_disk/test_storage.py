"""DiskStorage: slots file, O_DIRECT, block I/O with verification, start-up checks."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from kvbm_core.config import ConfigError
from kvbm_tiers_disk.slot_format import ALIGN, HEADER_BYTES
from kvbm_tiers_disk.storage import DiskBlockError, DiskStorage


def test_round_trip_every_slot(storage, rows_of):
    rows = rows_of(storage.num_slots, storage.layout.bytes_per_block)
    for slot in range(storage.num_slots):
        storage.write_block(slot, 1000 + slot, rows[slot])
    out = np.zeros_like(rows)
    for slot in reversed(range(storage.num_slots)):
        storage.read_block(slot, 1000 + slot, out[slot])
    assert np.array_equal(out, rows)
    stats = storage.stats
    assert stats["blocks_written"] == stats["blocks_read"] == storage.num_slots
    assert stats["corrupt_blocks"] == stats["io_errors"] == 0
    assert storage.stored_blocks() == {1000 + s: s for s in range(storage.num_slots)}


def test_file_is_preallocated_private_and_aligned(storage, cache_dir):
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    info = storage.path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == storage.num_slots * storage.geometry.stride
    assert info.st_blocks * 512 >= info.st_size  # allocated, not sparse
    assert storage.geometry.stride % ALIGN == 0
    assert storage.geometry.payload_bytes >= storage.layout.bytes_per_block


def test_o_direct_is_used_where_the_filesystem_allows(storage, use_o_direct):
    assert storage.is_o_direct == use_o_direct
    assert storage.stats["o_direct"] == int(use_o_direct)


def test_o_direct_refused_falls_back_with_one_warning(
    layout, cache_dir, monkeypatch, caplog_disk, rows_of
):
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    disk = DiskStorage(layout, 4, cache_dir, index_flush_secs=3600)
    try:
        assert not disk.is_o_direct
        row = rows_of(1, layout.bytes_per_block)[0]
        for _ in range(3):
            disk.write_block(0, 7, row)
        out = np.zeros_like(row)
        disk.read_block(0, 7, out)
        assert np.array_equal(out, row)
    finally:
        disk.close()
    warnings = [r for r in caplog_disk.records if "O_DIRECT" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_wrong_block_hash_is_refused_and_counted(storage, rows_of):
    row = rows_of(1, storage.layout.bytes_per_block)[0]
    storage.write_block(3, 42, row)
    out = np.full_like(row, 0xAB)
    with pytest.raises(DiskBlockError, match="not 0x2b") as info:
        storage.read_block(3, 43, out)
    assert info.value.is_corrupt
    assert storage.stats["corrupt_blocks"] == 1
    assert 42 not in storage.stored_blocks()  # a failed read drops the slot's entry


def test_never_written_slot_is_refused(storage):
    out = np.zeros(storage.layout.bytes_per_block, np.uint8)
    with pytest.raises(DiskBlockError, match="missing or damaged"):
        storage.read_block(5, 1, out)


@pytest.mark.parametrize("where", ["payload", "header", "last_payload_byte"])
def test_flipped_byte_on_disk_is_caught(storage, rows_of, where):
    bpb = storage.layout.bytes_per_block
    row = rows_of(1, bpb)[0]
    storage.write_block(2, 99, row)
    offset = (
        storage.geometry.offset(2)
        + {
            "payload": HEADER_BYTES + 17,
            "header": 40,
            "last_payload_byte": HEADER_BYTES + bpb - 1,
        }[where]
    )
    _flip_byte(storage.path, offset)
    out = np.zeros_like(row)
    with pytest.raises(DiskBlockError, match="verification") as info:
        storage.read_block(2, 99, out)
    assert info.value.is_corrupt
    assert storage.stats["corrupt_blocks"] == 1


def test_bytes_in_the_padding_do_not_matter(storage, rows_of):
    bpb = storage.layout.bytes_per_block
    if storage.geometry.payload_bytes == bpb:
        pytest.skip("this layout has no padding")
    row = rows_of(1, bpb)[0]
    storage.write_block(1, 5, row)
    _flip_byte(storage.path, storage.geometry.offset(1) + HEADER_BYTES + bpb)
    out = np.zeros_like(row)
    storage.read_block(1, 5, out)
    assert np.array_equal(out, row)


def test_truncated_file_fails_reads_not_the_process(storage, rows_of):
    row = rows_of(1, storage.layout.bytes_per_block)[0]
    storage.write_block(15, 8, row)
    os.truncate(storage.path, storage.geometry.offset(15) + 100)
    with pytest.raises(DiskBlockError, match="short read|missing or damaged"):
        storage.read_block(15, 8, np.zeros_like(row))
    assert storage.stats["corrupt_blocks"] == 1


def test_failed_read_leaves_destination_untouched(storage, rows_of):
    row = rows_of(1, storage.layout.bytes_per_block)[0]
    storage.write_block(0, 11, row)
    _flip_byte(storage.path, storage.geometry.offset(0) + HEADER_BYTES + 3)
    out = np.full_like(row, 0xEE)
    with pytest.raises(DiskBlockError):
        storage.read_block(0, 11, out)
    assert (out == 0xEE).all()


def test_slot_buffer_must_be_aligned(storage):
    with pytest.raises(ValueError, match="aligned"):
        storage.new_slot_buffer(lambda n: np.zeros(n + 1, np.uint8)[1:])


def test_out_of_range_slot_and_hash_are_errors(storage):
    out = np.zeros(storage.layout.bytes_per_block, np.uint8)
    with pytest.raises(DiskBlockError, match="out of range"):
        storage.read_block(storage.num_slots, 1, out)
    with pytest.raises(DiskBlockError, match="out of range"):
        storage.write_block(-1, 1, out)
    with pytest.raises(DiskBlockError, match="unsigned 64-bit"):
        storage.write_block(0, -5, out)
    with pytest.raises(DiskBlockError, match="unsigned 64-bit"):
        storage.write_block(0, 1 << 64, out)


def test_closed_storage_refuses_io_and_closes_twice(layout, cache_dir):
    disk = DiskStorage(layout, 2, cache_dir)
    disk.close()
    disk.close()
    with pytest.raises(DiskBlockError, match="closed"):
        disk.read_block(0, 1, np.zeros(layout.bytes_per_block, np.uint8))


def test_not_enough_space_names_dir_needed_and_free(layout, cache_dir):
    num_slots = (1 << 62) // (layout.bytes_per_block + 2 * ALIGN)
    with pytest.raises(ConfigError) as info:
        DiskStorage(layout, num_slots, cache_dir)
    message = str(info.value)
    assert str(cache_dir) in message
    stride = layout.bytes_per_block + ALIGN + (-layout.bytes_per_block) % ALIGN
    assert f"needs {num_slots * stride} bytes" in message
    assert "bytes free" in message and "needs" in message and "KVBM_DISK_CACHE_GB" in message
    assert not any(cache_dir.glob("*.slots")) or all(
        p.stat().st_size == 0 for p in cache_dir.glob("*.slots")
    )


def test_directory_that_cannot_be_created(tmp_path, layout):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot be created") as info:
        DiskStorage(layout, 2, blocker / "sub")
    assert str(blocker / "sub") in str(info.value)


def test_path_that_is_a_file(tmp_path, layout):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not a directory|cannot be created"):
        DiskStorage(layout, 2, blocker)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_a_clear_error(tmp_path, layout):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            DiskStorage(layout, 2, directory)
    finally:
        directory.chmod(0o700)


def test_read_only_filesystem_is_a_clear_error(tmp_path, layout, monkeypatch):
    """EROFS injected into os.open (works as root, unlike chmod)."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ConfigError, match="not writable.*Read-only file system"):
        DiskStorage(layout, 2, tmp_path)


def test_second_process_on_the_same_directory_is_refused(layout, cache_dir):
    disk = DiskStorage(layout, 2, cache_dir)
    try:
        with pytest.raises(ConfigError, match="in use by another process"):
            DiskStorage(layout, 2, cache_dir)
        other_rank = DiskStorage(layout, 2, cache_dir, rank=1)  # ranks have their own files
        other_rank.close()
    finally:
        disk.close()


def test_zero_slots_is_a_clear_error(layout, cache_dir):
    with pytest.raises(ConfigError, match="0 blocks"):
        DiskStorage(layout, 0, cache_dir)


def test_wider_file_permissions_are_tightened(layout, cache_dir):
    DiskStorage(layout, 2, cache_dir).close()
    path = next(cache_dir.glob("*.slots"))
    path.chmod(0o644)
    DiskStorage(layout, 2, cache_dir).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x5A]))
