"""The disk tier's transfer handlers: host <-> disk and GPU <-> disk, with injected faults.

The GPU pool is a CPU tensor here (no GPU on CI); the same code path copies through a pinned
bounce buffer on a CUDA stream on a GPU machine (see test_gpu_pool_on_cuda).
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time

import numpy as np
import pytest
import torch

from kvbm_core.layout import LayoutKind
from kvbm_core.transfer import DevicePool, TransferEngine, TransferJob
from kvbm_tiers_disk.handlers import (
    DiskToGpuHandler,
    DiskToHostHandler,
    GpuToDiskHandler,
    HostToDiskHandler,
)
from kvbm_tiers_disk.storage import DiskStorage

_ids = itertools.count(1)


def _job(src, dst, src_ids, dst_ids, hashes=None):
    if hashes is None:
        hashes = (
            tuple(10_000 + d for d in dst_ids)
            if dst == "disk"
            else tuple(10_000 + s for s in src_ids)
        )
    return TransferJob(next(_ids), src, dst, tuple(src_ids), tuple(dst_ids), tuple(hashes))


def _run(handler, jobs, ready=None):
    handler.submit(jobs, ready)
    results = handler.wait(timeout=60)
    assert handler.num_pending == 0
    assert sorted(r.job_id for r in results) == sorted(j.job_id for j in jobs)  # each once
    assert handler.poll() == []
    return {r.job_id: r for r in results}


@pytest.fixture
def host_pair(host, storage):
    up = HostToDiskHandler(host.host_view(), storage, num_threads=4)
    down = DiskToHostHandler(host.host_view(), storage, num_threads=4)
    yield up, down
    up.close()
    down.close()


def test_host_round_trip_many_jobs_in_flight(host, host_pair):
    up, down = host_pair
    original = host.rows.copy()
    slots = [15, 0, 7, 3, 9, 1, 12, 5, 2, 11, 8, 4]
    jobs = [_job("cpu", "disk", [r], [slots[r]]) for r in range(6)]
    jobs.append(_job("cpu", "disk", range(6, 12), slots[6:]))
    results = _run(up, jobs)
    assert all(r.ok and r.num_bytes > 0 for r in results.values())
    host.rows[:] = 0
    back = [_job("disk", "cpu", [slots[r]], [11 - r]) for r in range(12)]
    results = _run(down, back)
    assert all(r.ok for r in results.values())
    assert np.array_equal(host.rows[::-1], original)


def test_io_depth_one_still_moves_many_blocks(layout, cache_dir, make_host, rows_of):
    disk = DiskStorage(layout, 16, cache_dir, io_depth=1)
    host = make_host(layout, 16)
    host.rows[:] = rows_of(16, layout.bytes_per_block)
    original = host.rows.copy()
    up = HostToDiskHandler(host.host_view(), disk, num_threads=8)
    down = DiskToHostHandler(host.host_view(), disk, num_threads=8)
    try:
        assert all(r.ok for r in _run(up, [_job("cpu", "disk", range(16), range(16))]).values())
        host.rows[:] = 0
        assert all(r.ok for r in _run(down, [_job("disk", "cpu", range(16), range(16))]).values())
        assert np.array_equal(host.rows, original)
    finally:
        up.close()
        down.close()
        disk.close()


def test_corrupt_block_fails_its_job_only(host, host_pair, storage):
    up, down = host_pair
    _run(up, [_job("cpu", "disk", range(4), range(4))])
    with open(storage.path, "r+b") as f:
        f.seek(storage.geometry.offset(2) + 4096 + 10)
        f.write(b"\xff\xfe")
    good = _job("disk", "cpu", [0, 1], [5, 6])
    bad = _job("disk", "cpu", [2, 3], [7, 8])
    results = _run(down, [good, bad])
    assert results[good.job_id].ok
    assert not results[bad.job_id].ok
    assert results[bad.job_id].bad_block_hashes == (10_002,)
    assert "1 of 2 blocks failed" in results[bad.job_id].error
    assert storage.stats["corrupt_blocks"] == 1


def test_wrong_hash_in_job_is_caught(host, host_pair):
    up, down = host_pair
    _run(up, [_job("cpu", "disk", [0], [4])])
    job = _job("disk", "cpu", [4], [1], hashes=[123])
    (result,) = _run(down, [job]).values()
    assert not result.ok and result.bad_block_hashes == (123,)


def test_enospc_fails_stores_and_the_tier_recovers(
    host, host_pair, storage, monkeypatch, caplog_disk
):
    up, down = host_pair

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    jobs = [_job("cpu", "disk", [r], [r]) for r in range(3)]
    results = _run(up, jobs)
    assert not any(r.ok for r in results.values())
    assert all("No space left" in r.error for r in results.values())
    stats = storage.stats
    assert stats["enospc_errors"] == stats["io_errors"] == stats["write_failures"] == 3
    assert storage.stored_blocks() == {}
    errors = [
        r for r in caplog_disk.records if r.levelname == "ERROR" and "ENOSPC" in r.getMessage()
    ]
    assert len(errors) == 1  # logged once, counted every time

    monkeypatch.undo()
    assert all(r.ok for r in _run(up, [_job("cpu", "disk", [0], [0])]).values())
    assert all(r.ok for r in _run(down, [_job("disk", "cpu", [0], [1])]).values())


def test_short_write_fails_the_store(host, host_pair, storage, monkeypatch):
    up, _ = host_pair
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, offset: real(fd, [bufs[0][:4096]], offset))
    (result,) = _run(up, [_job("cpu", "disk", [0], [0])]).values()
    assert not result.ok and storage.stats["enospc_errors"] == 1


def test_eio_on_read_drops_the_block(host, host_pair, storage, monkeypatch):
    up, down = host_pair
    _run(up, [_job("cpu", "disk", [0, 1], [0, 1])])

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    (result,) = _run(down, [_job("disk", "cpu", [0, 1], [2, 3])]).values()
    assert not result.ok and set(result.bad_block_hashes) == {10_000, 10_001}
    assert "EIO" in result.error
    assert storage.stats["io_errors"] == 2 and storage.stored_blocks() == {}


def test_file_deleted_underneath(host, host_pair, storage, caplog_disk):
    up, down = host_pair
    _run(up, [_job("cpu", "disk", [0], [0])])
    storage.path.unlink()
    # The open file keeps working until shutdown...
    assert all(r.ok for r in _run(up, [_job("cpu", "disk", [1], [1])]).values())
    assert all(r.ok for r in _run(down, [_job("disk", "cpu", [1], [5])]).values())
    # ...but nothing claims it is persisted.
    assert storage.flush_index() is False
    assert storage.stats["file_lost"] == 1
    assert not storage.index_path.exists()
    assert any("deleted or replaced" in r.getMessage() for r in caplog_disk.records)


def test_bad_jobs_fail_as_results(host, host_pair, storage):
    up, down = host_pair
    good = _job("cpu", "disk", [0], [0])
    past_end = _job("cpu", "disk", [0], [storage.num_slots])
    negative = _job("disk", "cpu", [-1], [0])
    twice = _job("cpu", "disk", [0, 1], [3, 3])
    results = _run(up, [good, past_end, twice])
    assert results[good.job_id].ok
    assert "out of range" in results[past_end.job_id].error
    assert "twice" in results[twice.job_id].error
    assert "out of range" in _run(down, [negative])[negative.job_id].error
    wrong_pair = _job("gpu", "disk", [0], [0])
    assert "this handler moves cpu -> disk" in _run(up, [wrong_pair])[wrong_pair.job_id].error


def test_jobs_wait_for_their_ready_fence(host, host_pair):
    up, _ = host_pair
    ready = threading.Event()
    job = _job("cpu", "disk", [0, 1], [0, 1])
    up.submit([job], ready)
    time.sleep(0.05)
    assert up.poll() == [] and up.num_pending == 1
    ready.set()
    results = up.wait(timeout=60)
    assert [r.ok for r in results] == [True]


def test_submit_after_close_fails_rather_than_raises(host, storage):
    up = HostToDiskHandler(host.host_view(), storage, num_threads=2)
    up.close()
    up.close()
    job = _job("cpu", "disk", [0], [0])
    up.submit([job])
    (result,) = up.wait(timeout=10)
    assert not result.ok and "closed" in result.error


def test_host_rows_of_another_layout_are_refused(storage, make_host):
    from dataclasses import replace

    other = replace(storage.layout, head_dim=storage.layout.head_dim * 2)
    with pytest.raises(ValueError, match="same layout"):
        HostToDiskHandler(make_host(other, 2).host_view(), storage)


# ---------------------------------------------------------------------- GPU pool


def _pool(layout, num_blocks, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, layout.kv_factor, layout.elements_per_region)
    if layout.kind is LayoutKind.FULLY_CONTIGUOUS:
        tensors = [torch.randn((num_blocks, layout.num_layers, *shape[1:]), generator=gen)]
    else:
        tensors = [torch.randn(shape, generator=gen) for _ in range(layout.num_layers)]
    tensors = [t.to(torch.float16).to(device) for t in tensors]
    return DevicePool(tensors, layout)


def _block_bytes(pool, block_id):
    """The tier's byte order for one block: layer after layer."""
    if pool.layout.kind is LayoutKind.FULLY_CONTIGUOUS:
        block = pool.tensors[0][block_id]
    else:
        block = torch.stack([t[block_id] for t in pool.tensors])
    return block.contiguous().cpu().view(torch.uint8).numpy().reshape(-1).copy()


@pytest.fixture(params=list(LayoutKind), ids=[k.value for k in LayoutKind])
def gpu_storage(request, layout, cache_dir, use_o_direct):
    from dataclasses import replace

    disk = DiskStorage(
        replace(layout, kind=request.param),
        16,
        cache_dir,
        use_o_direct=use_o_direct,
        index_flush_secs=3600,
    )
    yield disk
    disk.close()


def _gpu_round_trip(disk, device):
    pool = _pool(disk.layout, 10, device)
    expected = [_block_bytes(pool, b) for b in range(10)]
    down = GpuToDiskHandler(pool, disk, num_threads=4)
    up = DiskToGpuHandler(pool, disk, num_threads=4)
    try:
        results = _run(down, [_job("gpu", "disk", [b], [15 - b]) for b in range(10)])
        assert all(r.ok for r in results.values())
        out = np.zeros(disk.layout.bytes_per_block, np.uint8)
        for b in range(10):
            disk.read_block(15 - b, 10_000 + 15 - b, out)
            assert np.array_equal(out, expected[b])
        for t in pool.tensors:
            t.zero_()
        results = _run(
            up, [_job("disk", "gpu", [15 - b for b in range(10)], [9 - b for b in range(10)])]
        )
        assert all(r.ok for r in results.values())
        for b in range(10):
            assert np.array_equal(_block_bytes(pool, 9 - b), expected[b])
    finally:
        down.close()
        up.close()


def test_gpu_pool_round_trip_both_layouts(gpu_storage):
    _gpu_round_trip(gpu_storage, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pool_on_cuda(gpu_storage):
    _gpu_round_trip(gpu_storage, "cuda")


def test_unverified_bytes_never_reach_the_gpu_pool(gpu_storage):
    pool = _pool(gpu_storage.layout, 4)
    down = GpuToDiskHandler(pool, gpu_storage, num_threads=2)
    up = DiskToGpuHandler(pool, gpu_storage, num_threads=2)
    try:
        _run(down, [_job("gpu", "disk", [0, 1], [0, 1])])
        with open(gpu_storage.path, "r+b") as f:
            f.seek(gpu_storage.geometry.offset(1) + 4096)
            f.write(b"\x00" * 8 if f.read(8) != b"\x00" * 8 else b"\x01" * 8)
        before = [_block_bytes(pool, b) for b in range(4)]
        job = _job("disk", "gpu", [0, 1], [2, 3])
        (result,) = _run(up, [job]).values()
        assert not result.ok and result.bad_block_hashes == (10_001,)
        assert np.array_equal(_block_bytes(pool, 2), before[0])  # the good block landed
        assert np.array_equal(_block_bytes(pool, 3), before[3])  # the bad one did not
    finally:
        down.close()
        up.close()


def test_pool_of_another_layout_is_refused(gpu_storage):
    from dataclasses import replace

    other = replace(gpu_storage.layout, num_layers=gpu_storage.layout.num_layers + 1)
    with pytest.raises(ValueError, match="same layout"):
        GpuToDiskHandler(_pool(other, 2), gpu_storage)


def test_non_contiguous_pool_is_refused(gpu_storage):
    pool = _pool(gpu_storage.layout, 4)
    pool.tensors = [t.transpose(1, 2) if t.dim() == 3 else t.transpose(2, 3) for t in pool.tensors]
    with pytest.raises(ValueError, match="not contiguous within a block"):
        DiskToGpuHandler(pool, gpu_storage)


def test_handlers_work_inside_a_transfer_engine(host, storage):
    pool = _pool(storage.layout, 4)
    engine = TransferEngine(
        [
            HostToDiskHandler(host.host_view(), storage, 2),
            DiskToHostHandler(host.host_view(), storage, 2),
            GpuToDiskHandler(pool, storage, 2),
            DiskToGpuHandler(pool, storage, 2),
        ]
    )
    jobs = [
        _job("cpu", "disk", [0], [0]),
        _job("gpu", "disk", [1], [1]),
    ]
    engine.submit(jobs)
    assert all(r.ok for r in engine.wait(timeout=60))
    engine.submit([_job("disk", "gpu", [0], [3]), _job("disk", "cpu", [1], [5])])
    assert all(r.ok for r in engine.wait(timeout=60))
    assert np.array_equal(_block_bytes(pool, 3), host.rows[0])
    assert np.array_equal(host.rows[5], _block_bytes(pool, 1))
    engine.close()


def test_close_fails_blocks_waiting_for_a_fence_that_never_fires(host, storage):
    up = HostToDiskHandler(host.host_view(), storage, num_threads=2)
    never = threading.Event()
    jobs = [_job("cpu", "disk", [r], [r]) for r in range(4)]
    up.submit(jobs, never)
    up.close()
    results = up.poll()
    assert sorted(r.job_id for r in results) == sorted(j.job_id for j in jobs)
    assert not any(r.ok for r in results) and up.num_pending == 0
    assert storage.stored_blocks() == {}


def test_storage_close_waits_for_io_in_flight(layout, cache_dir, rows_of, monkeypatch):
    disk = DiskStorage(layout, 4, cache_dir)
    entered, release = threading.Event(), threading.Event()
    real = os.pwritev

    def slow(fd, buffers, offset):
        entered.set()
        release.wait(30)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", slow)
    writer = threading.Thread(
        target=disk.write_block, args=(1, 5, rows_of(1, layout.bytes_per_block)[0])
    )
    writer.start()
    assert entered.wait(30)
    closer = threading.Thread(target=disk.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # the descriptor stays open under the write
    release.set()
    writer.join(30)
    closer.join(30)
    assert not closer.is_alive()
    assert disk.stats["blocks_written"] == 1 and disk.stats["io_errors"] == 0
