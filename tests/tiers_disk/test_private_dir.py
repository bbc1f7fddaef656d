"""The disk tier trusts only a directory and files that no other user can change.

These tests run as any user; those that hand a file to another uid (65534, "nobody") need
root and skip otherwise. Each asserts that the refusal names the path, what is wrong and the
fix, that the planted file is left as it was (nothing is written through it, nothing read
from it is served), and that a private directory still works afterwards.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.layout import KvLayout
from kvbm_tiers_disk.storage import DiskStorage

SMALL = KvLayout(num_layers=2, tokens_per_block=4, num_kv_heads=2, head_dim=8, dtype="float16")

OTHER_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def random_rows(num_rows: int, num_bytes: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (num_rows, num_bytes), dtype=np.uint8)


def _open(directory: Path, **kwargs) -> DiskStorage:
    return DiskStorage(SMALL, 4, directory, use_o_direct=False, **kwargs)


def _assert_serves(directory: Path) -> None:
    """The engine keeps working: a private directory gives a working tier."""
    storage = _open(directory)
    try:
        row = random_rows(1, SMALL.bytes_per_block)[0]
        storage.write_block(0, 7, row)
        out = np.zeros_like(row)
        storage.read_block(0, 7, out)
        assert np.array_equal(out, row)
    finally:
        storage.close()


@needs_root
def test_a_directory_prepared_by_another_user_is_refused_and_left_alone(tmp_path: Path) -> None:
    # S4: the other user pre-creates the cache directory 0777 with an empty 0666 slots file.
    planted = tmp_path / "kvbm"
    planted.mkdir()
    os.chmod(planted, 0o777)
    slots = planted / "kvbm-disk-rank0.slots"
    slots.write_bytes(b"")
    os.chmod(slots, 0o666)
    os.chown(planted, OTHER_UID, OTHER_UID)
    os.chown(slots, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError) as caught:
        _open(planted)
    message = str(caught.value)
    assert str(planted) in message and f"owned by uid {OTHER_UID}" in message
    assert "KVBM_DISK_CACHE_DIR to a directory you own, mode 0700" in message
    info = slots.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode), info.st_size) == (OTHER_UID, 0o666, 0)
    _assert_serves(tmp_path / "mine")


@needs_root
def test_a_slots_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "kvbm"
    directory.mkdir(mode=0o700)
    slots = directory / "kvbm-disk-rank0.slots"
    slots.write_bytes(b"forged")
    os.chown(slots, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError, match=rf"file '{slots}' is owned by uid {OTHER_UID}.*you own"):
        _open(directory)
    assert slots.read_bytes() == b"forged"


def test_a_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "kvbm"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(ConfigError) as caught:
        _open(directory)
    message = str(caught.value)
    assert "mode 0777" in message and "writable by other users" in message
    assert f"chmod go-w {directory}" in message
    assert list(directory.iterdir()) == []  # nothing was created in it
    os.chmod(directory, 0o700)
    _assert_serves(directory)  # the fix the message gives works


def test_a_slots_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "kvbm"
    directory.mkdir(mode=0o700)
    slots = directory / "kvbm-disk-rank0.slots"
    slots.write_bytes(b"")
    os.chmod(slots, 0o666)
    with pytest.raises(ConfigError, match=r"mode 0666, writable by other users"):
        _open(directory)


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match=r"is a symbolic link .*the real directory"):
        _open(link)
    assert list(real.iterdir()) == []


def test_a_hard_link_planted_at_the_slots_file_is_not_written_through(tmp_path: Path) -> None:
    directory = tmp_path / "kvbm"
    directory.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.chmod(victim, 0o600)
    os.link(victim, directory / "kvbm-disk-rank0.slots")
    with pytest.raises(ConfigError) as caught:
        _open(directory)
    assert "has 2 hard links" in str(caught.value) and "delete it" in str(caught.value)
    assert victim.read_bytes() == b"precious"  # not truncated, not preallocated


def test_a_symlink_planted_at_the_slots_file_is_not_followed(tmp_path: Path) -> None:
    directory = tmp_path / "kvbm"
    directory.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (directory / "kvbm-disk-rank0.slots").symlink_to(victim)
    with pytest.raises(ConfigError, match="cannot open the disk tier file"):
        _open(directory)
    assert victim.read_bytes() == b"precious"


def test_a_hard_link_at_the_index_is_refused_and_nothing_is_served(tmp_path: Path) -> None:
    directory = tmp_path / "kvbm"
    storage = _open(directory)
    storage.write_block(0, 7, random_rows(1, SMALL.bytes_per_block)[0])
    storage.close()
    os.link(directory / "kvbm-disk-rank0.index", tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"kvbm-disk-rank0.index' has 2 hard links"):
        _open(directory)


def test_a_hard_link_at_the_journal_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "kvbm"
    storage = _open(directory)
    storage.write_block(0, 7, random_rows(1, SMALL.bytes_per_block)[0])
    storage.close()
    os.link(directory / "kvbm-disk-rank0.journal", tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"kvbm-disk-rank0.journal' has 2 hard links"):
        _open(directory)


def test_a_symlink_planted_at_the_journal_is_neither_read_nor_written(tmp_path: Path) -> None:
    directory = tmp_path / "kvbm"
    storage = _open(directory)
    storage.write_block(0, 7, random_rows(1, SMALL.bytes_per_block)[0])
    storage.close()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    journal = directory / "kvbm-disk-rank0.journal"
    journal.unlink()
    journal.symlink_to(victim)
    storage = _open(directory)
    try:
        assert storage.persisted_blocks() == {7: 0}  # the snapshot alone
        storage.write_block(1, 8, random_rows(1, SMALL.bytes_per_block)[0])
    finally:
        storage.close()
    assert victim.read_bytes() == b"precious"
    assert not journal.is_symlink()  # replaced by a journal of our own
    _assert_serves(directory)


def test_the_default_directory_is_per_user_and_never_shared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    config = KvbmConfig.from_env({})
    assert config.disk_cache_dir == str(tmp_path / "xdg" / "kvbm")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert KvbmConfig().disk_cache_dir == str(tmp_path / ".cache" / "kvbm")
    assert config.check_disk_dir() == tmp_path / "xdg" / "kvbm"
    assert stat.S_IMODE((tmp_path / "xdg" / "kvbm").stat().st_mode) == 0o700
