"""Page regions (KVCacheManagerV2 layouts) through the G2 handlers: gather/scatter per group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm_core.regions import PageRegion, RegionPool, block_layout
from kvbm_core.transfer import TransferJob
from kvbm_tiers_cpu.handlers import GpuToHostHandler, HostToGpuHandler
from kvbm_tiers_cpu.storage import PinnedHostStorage

N, HALF = 8, 64


def region_pool() -> RegionPool:
    tensors = [torch.randint(0, 256, (N, HALF), dtype=torch.uint8) for _ in range(2)]
    regions = [PageRegion(g, g * HALF, HALF, t) for g, t in enumerate(tensors)]
    pool = RegionPool(regions, block_layout(16, 2 * HALF), [N, N])
    pool.set_pages(list(range(N)), [[N - 1 - b for b in range(N)]])
    return pool


def test_layer_group_pages_round_trip_through_the_host_tier():
    pool = region_pool()
    host = PinnedHostStorage(pool.layout, 4, pin=False)
    host.wait_ready(10)
    out, back = GpuToHostHandler(pool, host), HostToGpuHandler(pool, host)
    out.submit([TransferJob(1, "gpu", "cpu", (2, 5), (0, 1))])
    assert all(r.ok for r in out.wait(5))
    g0, g1 = (r.rows for r in pool.regions)
    expected = torch.cat([g0[2], g1[N - 1 - 2]])
    assert torch.equal(torch.from_numpy(np.asarray(host.rows[0])), expected)
    # A block that left the sliding window: its page there is not written back.
    pool.set_pages([6], [[-1]])
    before = g1.clone()
    back.submit([TransferJob(2, "cpu", "gpu", (0,), (6,))])
    assert all(r.ok for r in back.wait(5))
    assert torch.equal(g0[6], g0[2]) and torch.equal(g1, before)


def test_a_store_of_a_block_without_a_page_fails_naming_the_group():
    pool = region_pool()
    pool.set_pages([3], [[-1]])
    host = PinnedHostStorage(pool.layout, 4, pin=False)
    host.wait_ready(10)
    handler = GpuToHostHandler(pool, host)
    handler.submit([TransferJob(1, "gpu", "cpu", (3,), (0,))])
    [result] = handler.wait(5)
    assert not result.ok and "no page in layer group 1" in result.error


def test_none_keeps_a_recorded_page_and_bad_pages_are_refused():
    pool = region_pool()
    pool.set_pages([1], [[None]])
    assert pool.pages_of(1, np.array([1]))[0] == N - 2
    with pytest.raises(ValueError, match="out of range"):
        pool.set_pages([1], [[N]])
