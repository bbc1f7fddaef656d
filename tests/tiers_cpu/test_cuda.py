"""CUDA-only behaviour: real pinning, ordering after the forward pass, both directions at once."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvbm_tiers_cpu import GpuToHostHandler, HostToGpuHandler, PinnedHostStorage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_storage_is_pinned_in_the_background(kv):
    layout = kv.make_layout(kv.FC, num_layers=8, heads=8, tokens=16, head_dim=128)
    host = PinnedHostStorage(layout, 512, pin_chunk_bytes=64 << 20, pin_threads=4)
    assert len(host.pin_ranges) > 1
    host.wait_ready(60)
    assert host.is_ready and host.rows.is_pinned()
    assert all(host.rows[start].is_pinned() for start, _ in host.pin_ranges)
    host.close()


def test_offload_waits_for_the_ready_event_not_the_host(kv):
    """The pool is rewritten on the compute stream behind a long sleep: submit() must return
    before that work is done (no host sync), and the copy must still see the new bytes."""
    layout = kv.make_layout(kv.FC, num_layers=4, heads=4, tokens=16, head_dim=64)
    pool = kv.make_pool(layout, 64, "cuda")
    host = PinnedHostStorage(layout, 64)
    host.wait_ready(60)
    offload = GpuToHostHandler(pool, host)
    warm_up = kv.job("gpu", "cpu", range(32, 48), range(32, 48))  # first-use costs out of the way
    assert kv.run(offload, [[warm_up]], torch.cuda.current_stream().record_event())[warm_up.job_id].ok
    pool.tensors[0].view(torch.uint8)[48:].fill_(0)  # loads the fill kernel: lazy loading can sync
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # about half a second of GPU time
    pool.tensors[0].view(torch.uint8).fill_(0xAB)
    ready = torch.cuda.current_stream().record_event()
    job = kv.job("gpu", "cpu", range(16), range(16))
    start = time.perf_counter()
    offload.submit([job], ready)
    submit_s = time.perf_counter() - start
    assert not ready.query(), f"submit() took {submit_s:.3f} s: it waited for the compute stream"
    assert offload.poll() == []
    results = kv.run(offload, [], submitted=[job])
    assert results[job.job_id].ok
    assert (host.host_view()[:16] == 0xAB).all()
    offload.close()
    host.close()


def test_dropped_storage_unpins_its_memory(kv):
    """Without close(), a new storage must still be able to pin (no stale registration)."""
    layout = kv.make_layout(kv.FC)
    for _ in range(3):
        host = PinnedHostStorage(layout, 64, huge_pages=False)
        host.wait_ready(60)
        del host


@pytest.mark.parametrize("zero_copy", [False, True])
def test_scattered_slots_both_paths(kv, rng, zero_copy):
    pytest.importorskip("triton")
    layout = kv.make_layout(kv.LS, num_layers=8, heads=2, tokens=16, head_dim=64)
    pool = kv.make_pool(layout, 128, "cuda", "separate")
    host = PinnedHostStorage(layout, 256)
    host.wait_ready(60)
    offload = GpuToHostHandler(pool, host, zero_copy=zero_copy)
    onboard = HostToGpuHandler(pool, host, zero_copy=zero_copy)
    assert offload.is_batched and offload.is_zero_copy_enabled is zero_copy
    gpu_ids, slots = rng.permutation(128)[:100], rng.permutation(256)[:100]
    ready = torch.cuda.current_stream().record_event()
    results = kv.run(offload, [[kv.job("gpu", "cpu", gpu_ids, slots)]], ready)
    assert all(r.ok for r in results.values())
    np.testing.assert_array_equal(host.host_view()[slots], kv.block_bytes(pool, gpu_ids))
    host.host_view()[slots] = rng.integers(0, 256, (100, layout.bytes_per_block), dtype=np.uint8)
    results = kv.run(onboard, [[kv.job("cpu", "gpu", slots, gpu_ids)]], torch.cuda.current_stream().record_event())
    assert all(r.ok for r in results.values())
    np.testing.assert_array_equal(kv.block_bytes(pool, gpu_ids), host.host_view()[slots])
    offload.close()
    onboard.close()
    host.close()


def test_both_directions_at_once(kv, rng):
    layout = kv.make_layout(kv.LS, num_layers=8, heads=8, tokens=16, head_dim=128)
    pool = kv.make_pool(layout, 256, "cuda", "separate")
    host = PinnedHostStorage(layout, 512)
    host.wait_ready(60)
    host.host_view()[256:384] = rng.integers(0, 256, (128, layout.bytes_per_block), dtype=np.uint8)
    offload, onboard = GpuToHostHandler(pool, host), HostToGpuHandler(pool, host)
    expected_out = kv.block_bytes(pool, range(128))
    ready = torch.cuda.current_stream().record_event()
    store = kv.job("gpu", "cpu", range(128), range(128))
    load = kv.job("cpu", "gpu", range(256, 384), range(128, 256))
    offload.submit([store], ready)
    onboard.submit([load], ready)
    stored = kv.run(offload, [], submitted=[store])
    loaded = kv.run(onboard, [], submitted=[load])
    assert stored[store.job_id].ok and loaded[load.job_id].ok
    np.testing.assert_array_equal(host.host_view()[:128], expected_out)
    np.testing.assert_array_equal(kv.block_bytes(pool, range(128, 256)), host.host_view()[256:384])
    offload.close()
    onboard.close()
    host.close()


def test_the_first_pinned_range_serves_before_the_rest_is_pinned(kv):
    """4 GiB in 64 MiB ranges, one thread: about 2 s to pin, its first range in ~30 ms."""
    layout = kv.make_layout(kv.FC, num_layers=8, heads=8, tokens=16, head_dim=128)  # 256 KiB blocks
    num_slots = (4 << 30) // layout.bytes_per_block
    pool = kv.make_pool(layout, 16, "cuda")
    host = PinnedHostStorage(layout, num_slots, pin_chunk_bytes=64 << 20, pin_threads=1)
    offload = GpuToHostHandler(pool, host)
    job = kv.job("gpu", "cpu", range(8), range(8))
    offload.submit([job], torch.cuda.current_stream().record_event())
    deadline = time.monotonic() + 30
    results = []
    while not results and time.monotonic() < deadline:
        results = offload.poll()
        time.sleep(0.001)
    assert results and results[0].ok
    assert not host.is_ready, "the job ran from the first range while the others still pinned"
    assert host.rows[0].is_pinned()
    np.testing.assert_array_equal(host.host_view()[:8], kv.block_bytes(pool, range(8)))
    host.wait_ready(120)
    offload.close()
    host.close()
