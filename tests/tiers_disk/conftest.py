"""Fixtures of the disk tier tests: small layouts, a storage in a temporary directory, and a
host array standing in for the cpu tier's ``host_view()`` (the disk handlers only see that
array, so a plain numpy array is the real interface, not a mock)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kvbm_core.layout import KvLayout, LayoutKind
from kvbm_core.transfer import CPU, Storage
from kvbm_tiers_disk.buffers import aligned_array
from kvbm_tiers_disk.storage import DiskStorage

# 2 layers x K,V x (2 heads x 4 tokens x 8) fp16 = 512 bytes: not a multiple of 4 KiB, so
# every O_DIRECT transfer goes through the bounce buffer.
SMALL = KvLayout(num_layers=2, tokens_per_block=4, num_kv_heads=2, head_dim=8, dtype="float16")
# 2 layers x K,V x (2 heads x 16 tokens x 64) fp16 = 16 KiB: O_DIRECT straight into the rows.
ALIGNED = KvLayout(num_layers=2, tokens_per_block=16, num_kv_heads=2, head_dim=64, dtype="float16")
LAYOUTS = {"small": SMALL, "aligned": ALIGNED}
SMALL_SEPARATE = replace(SMALL, kind=LayoutKind.LAYER_SEPARATE)
ALIGNED_SEPARATE = replace(ALIGNED, kind=LayoutKind.LAYER_SEPARATE)


class HostRows(Storage):
    """The minimum of a cpu tier the disk handlers use: ``host_view()`` rows."""

    medium = CPU

    def __init__(self, layout: KvLayout, num_slots: int) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.rows = aligned_array(num_slots * layout.bytes_per_block).reshape(num_slots, -1)

    def host_view(self) -> np.ndarray:
        return self.rows


def random_rows(num_rows: int, num_bytes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_rows, num_bytes), dtype=np.uint8)


@pytest.fixture(params=["small", "aligned"])
def layout(request: pytest.FixtureRequest) -> KvLayout:
    return LAYOUTS[request.param]


@pytest.fixture(params=[True, False], ids=["o_direct", "buffered"])
def use_o_direct(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "kvbm-disk"


@pytest.fixture
def storage(layout: KvLayout, cache_dir: Path, use_o_direct: bool) -> Iterator[DiskStorage]:
    disk = DiskStorage(layout, 16, cache_dir, use_o_direct=use_o_direct, index_flush_secs=3600)
    yield disk
    disk.close()


@pytest.fixture
def caplog_disk(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="kvbm_tiers_disk")
    return caplog


@pytest.fixture
def make_host() -> type[HostRows]:
    return HostRows


@pytest.fixture
def rows_of():
    return random_rows


@pytest.fixture
def layouts() -> dict[str, KvLayout]:
    return dict(LAYOUTS, aligned_separate=ALIGNED_SEPARATE, small_separate=SMALL_SEPARATE)


@pytest.fixture
def host(make_host, storage, rows_of):
    """Twelve host rows of random blocks in the storage's layout (the "cpu" tier's view)."""
    rows = make_host(storage.layout, 12)
    rows.rows[:] = rows_of(12, storage.layout.bytes_per_block, seed=3)
    return rows
