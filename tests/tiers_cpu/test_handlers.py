"""GPU <-> host handlers: round trips, batching, coalescing and failure reporting.

The same tests run on plain CPU tensors (the "GPU" pool is then a CPU tensor, which is how CI
runs them) and, marked ``gpu``, on a CUDA device where one is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm_core import DevicePool, TransferEngine
from kvbm_tiers_cpu import GpuToHostHandler, HostToGpuHandler, PinnedHostStorage
from kvbm_tiers_cpu.handlers import ZERO_COPY_BELOW_RUN_BYTES, _is_fragmented, host_runs

_GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# "cuda": staging buffers and copy engines only; "cuda+zc": zero-copy for scattered slots too.
DEVICES = ["cpu", pytest.param("cuda", marks=_GPU_MARKS), pytest.param("cuda+zc", marks=_GPU_MARKS)]
POOLS = [("fully_contiguous", "-"), ("layer_separate", "separate"), ("layer_separate", "layer_major"), ("layer_separate", "block_major")]


def _ready(device: str):
    return torch.cuda.current_stream().record_event() if device.startswith("cuda") else None


def _setup(kv, kind, arrangement, device, num_blocks=40, num_slots=64, staging_blocks=3, pin_chunk_blocks=None):
    zero_copy = None if device == "cpu" else device.endswith("+zc")
    if zero_copy:
        pytest.importorskip("triton")
    device = device.removesuffix("+zc")
    layout = kv.make_layout(kind)
    pool = kv.make_pool(layout, num_blocks, device, arrangement)
    chunk = (pin_chunk_blocks or num_slots) * layout.bytes_per_block
    host = PinnedHostStorage(layout, num_slots, pin=device == "cuda", pin_chunk_bytes=chunk, huge_pages=False)
    host.wait_ready(60)
    staging = staging_blocks * layout.bytes_per_block
    offload = GpuToHostHandler(pool, host, staging_bytes=staging, zero_copy=zero_copy)
    onboard = HostToGpuHandler(pool, host, staging_bytes=staging, zero_copy=zero_copy)
    return layout, pool, host, offload, onboard


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("kind", "arrangement"), POOLS)
def test_round_trip_moves_every_byte(kv, rng, device, kind, arrangement):
    layout, pool, host, offload, onboard = _setup(kv, kind, arrangement, device, pin_chunk_blocks=5)
    gpu_ids = rng.permutation(40)[:30]
    slot_ids = rng.permutation(64)[:30]  # non-adjacent, unordered
    sizes = [1, 7, 2, 9, 11]  # jobs that straddle staging buffers (3 blocks each)
    bounds = np.cumsum([0, *sizes])
    jobs = [kv.job("gpu", "cpu", gpu_ids[a:b], slot_ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    results = kv.run(offload, [jobs[:2], jobs[2:4], jobs[4:]], _ready(device))
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    assert {j.job_id: j.num_blocks * layout.bytes_per_block for j in jobs} == {i: r.num_bytes for i, r in results.items()}
    expected = kv.block_bytes(pool, gpu_ids)
    np.testing.assert_array_equal(host.host_view()[slot_ids], expected)

    target = kv.make_pool(layout, 40, device.removesuffix("+zc"), arrangement)
    back_ids = rng.permutation(40)[:30]
    back = [kv.job("cpu", "gpu", slot_ids[a:b], back_ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    onboard_pool_before = kv.block_bytes(target, range(40))
    onboard2 = HostToGpuHandler(target, host, staging_bytes=3 * layout.bytes_per_block, zero_copy=onboard.is_zero_copy_enabled)
    results = kv.run(onboard2, [back[:3], back[3:]], _ready(device))
    assert all(r.ok for r in results.values())
    after = kv.block_bytes(target, range(40))
    np.testing.assert_array_equal(after[back_ids], expected)
    untouched = np.setdiff1d(np.arange(40), back_ids)
    np.testing.assert_array_equal(after[untouched], onboard_pool_before[untouched])
    for handler in (offload, onboard, onboard2):
        handler.close()
    host.close()


@pytest.mark.parametrize("device", DEVICES)
def test_adjacent_and_scattered_slots_in_one_job(kv, rng, device):
    """Slots in every order, runs crossing pinned-range boundaries, in one job."""
    layout, pool, host, offload, onboard = _setup(kv, kv.FC, "-", device, staging_blocks=16, pin_chunk_blocks=4)
    assert host.pin_ranges[:2] == [(0, 4), (4, 8)]
    gpu_ids = rng.permutation(40)[:20]
    slot_ids = np.array([9, 3, 4, 5, 6, 7, 8, 30, 31, 32, 2, 50, 49, 48, 10, 11, 12, 13, 63, 0])
    results = kv.run(offload, [[kv.job("gpu", "cpu", gpu_ids, slot_ids)]], _ready(device))
    assert all(r.ok for r in results.values())
    np.testing.assert_array_equal(host.host_view()[slot_ids], kv.block_bytes(pool, gpu_ids))
    host.host_view()[slot_ids] = rng.integers(0, 256, (20, layout.bytes_per_block), dtype=np.uint8)
    results = kv.run(onboard, [[kv.job("cpu", "gpu", slot_ids, gpu_ids)]], _ready(device))
    assert all(r.ok for r in results.values())
    np.testing.assert_array_equal(kv.block_bytes(pool, gpu_ids), host.host_view()[slot_ids])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_jobs_fail_alone(kv, rng, device):
    layout, pool, host, offload, onboard = _setup(kv, kv.LS, "separate", device)
    good = kv.job("gpu", "cpu", [1, 2, 3], [10, 11, 12])
    bad_slot = kv.job("gpu", "cpu", [4, 5], [13, 64])
    bad_block = kv.job("gpu", "cpu", [40], [14])
    negative = kv.job("gpu", "cpu", [-1], [15])
    twice = kv.job("gpu", "cpu", [6, 7], [16, 16])
    wrong_pair = kv.job("cpu", "gpu", [1], [1])
    empty = kv.job("gpu", "cpu", [], [])
    jobs = [good, bad_slot, bad_block, negative, twice, wrong_pair, empty]
    before = host.host_view().copy()
    results = kv.run(offload, [jobs], _ready(device))
    assert results[good.job_id].ok and results[good.job_id].num_bytes == 3 * layout.bytes_per_block
    assert results[empty.job_id].ok and results[empty.job_id].num_bytes == 0
    assert "cpu slot 64 is out of range 0..63" in results[bad_slot.job_id].error
    assert "gpu block 40 is out of range 0..39" in results[bad_block.job_id].error
    assert "gpu block -1 is out of range" in results[negative.job_id].error
    assert "cpu slot 16 is named more than once" in results[twice.job_id].error
    assert "cpu -> gpu job was sent to the gpu -> cpu handler" in results[wrong_pair.job_id].error
    for failed in (bad_slot, bad_block, negative, twice, wrong_pair):
        assert not results[failed.job_id].ok
    np.testing.assert_array_equal(host.host_view()[[10, 11, 12]], kv.block_bytes(pool, [1, 2, 3]))
    untouched = [i for i in range(64) if i not in (10, 11, 12)]
    np.testing.assert_array_equal(host.host_view()[untouched], before[untouched])
    onboard_results = kv.run(onboard, [[kv.job("cpu", "gpu", [1, 2], [3, 3])]], _ready(device))
    assert "gpu block 3 is named more than once" in next(iter(onboard_results.values())).error


def test_an_error_while_launching_fails_the_batch_and_never_raises(kv, rng, monkeypatch):
    layout, pool, host, offload, _ = _setup(kv, kv.FC, "-", "cpu", staging_blocks=2)
    calls = []

    def broken_gather(block_ids, rows):
        calls.append(len(block_ids))
        if len(calls) == 2:
            raise RuntimeError("device fell off the bus")
        rows.zero_()

    monkeypatch.setattr(offload._pool, "gather", broken_gather)
    first = kv.job("gpu", "cpu", [1, 2], [1, 2])
    second = kv.job("gpu", "cpu", [3, 4, 5], [3, 4, 5])
    results = kv.run(offload, [[first, second]])
    assert results[first.job_id].ok
    assert not results[second.job_id].ok
    assert results[second.job_id].error == "RuntimeError: device fell off the bus"


@pytest.mark.parametrize(("kind", "arrangement", "is_batched"), [
    ("fully_contiguous", "-", True), ("layer_separate", "layer_major", True),
    ("layer_separate", "block_major", True), ("layer_separate", "separate", False),
])
def test_one_kernel_per_batch_where_the_pool_allows(kv, kind, arrangement, is_batched):
    layout, pool, host, offload, onboard = _setup(kv, kind, arrangement, "cpu")
    assert offload.is_batched is is_batched and onboard.is_batched is is_batched


def test_pool_and_tier_layouts_must_agree(kv):
    layout = kv.make_layout(kv.FC)
    pool = kv.make_pool(layout, 4)
    host = PinnedHostStorage(kv.make_layout(kv.FC, num_layers=2), 4, pin=False)
    with pytest.raises(ValueError, match="build the cpu tier from the pool's layout"):
        GpuToHostHandler(pool, host)
    wrong = DevicePool([torch.zeros(4, 3, 2, layout.elements_per_region, dtype=torch.bfloat16)], layout)
    with pytest.raises(ValueError, match="the KvLayout does not describe this pool"):
        GpuToHostHandler(wrong, PinnedHostStorage(layout, 4, pin=False))
    strided = torch.zeros(layout.num_layers, 2, layout.elements_per_region, 4, dtype=torch.bfloat16).permute(3, 0, 1, 2)
    with pytest.raises(ValueError, match="does not keep each block's bytes contiguous"):
        GpuToHostHandler(DevicePool([strided], layout), PinnedHostStorage(layout, 4, pin=False))


def test_closed_handler_fails_new_jobs(kv):
    _, _, _, offload, _ = _setup(kv, kv.FC, "-", "cpu")
    offload.close()
    offload.close()
    late = kv.job("gpu", "cpu", [1], [1])
    assert "handler is closed" in kv.run(offload, [[late]])[late.job_id].error


def test_engine_routes_both_directions_at_once(kv, rng):
    layout, pool, host, offload, onboard = _setup(kv, kv.LS, "separate", "cpu")
    engine = TransferEngine([offload, onboard])
    host.host_view()[40:50] = rng.integers(0, 256, (10, layout.bytes_per_block), dtype=np.uint8)
    store = kv.job("gpu", "cpu", range(10), range(10))
    load = kv.job("cpu", "gpu", range(40, 50), range(20, 30))
    engine.submit([store, load])
    results = {r.job_id: r for r in engine.wait(timeout=30)}
    assert results[store.job_id].ok and results[load.job_id].ok
    np.testing.assert_array_equal(host.host_view()[:10], kv.block_bytes(pool, range(10)))
    np.testing.assert_array_equal(kv.block_bytes(pool, range(20, 30)), host.host_view()[40:50])


def test_host_runs_coalesce_consecutive_slots_within_pinned_ranges():
    slots = np.array([5, 6, 7, 2, 3, 9])
    assert host_runs(slots, 100) == [(5, 0, 3), (2, 3, 2), (9, 5, 1)]
    assert host_runs(np.array([3, 4, 5, 6, 7, 8]), 4) == [(3, 0, 1), (4, 1, 4), (8, 5, 1)]
    assert host_runs(np.array([], dtype=np.int64), 4) == []


def test_only_scattered_buffers_take_the_zero_copy_kernel():
    mib = 1 << 20
    assert not _is_fragmented([(0, 0, 16)], 16 * mib)  # one run: one copy
    assert not _is_fragmented([(0, 0, 8), (100, 8, 8)], 16 * mib)  # two 8 MiB runs
    assert _is_fragmented([(i * 2, i, 1) for i in range(64)], 64 * 128 * 1024)  # 128 KiB each
    runs = [(0, 0, 1), (9, 1, 1)]
    assert _is_fragmented(runs, 2 * ZERO_COPY_BELOW_RUN_BYTES - 2)
    assert not _is_fragmented(runs, 2 * ZERO_COPY_BELOW_RUN_BYTES)
