"""The executor's block pool: TensorRT-LLM layout, prefix reuse, reference counts, LRU eviction."""

from __future__ import annotations

import pytest
import torch

from kvbm_trtllm.executor import BlockPool, PoolConfig


def make_pool(num_blocks: int = 4, reuse: bool = True) -> BlockPool:
    return BlockPool(
        PoolConfig(num_blocks=num_blocks, tokens_per_block=4, enable_block_reuse=reuse),
        num_layers=3,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        device="cpu",
    )


def test_layout_is_blocks_layers_kv_heads_tokens_dim():
    pool = make_pool()
    assert pool.tensor.shape == (4, 3, 2, 2 * 4 * 8)
    view = pool.layer_view(1, 1)
    view[2, 1, 3, 5] = 7.0
    # heads, then tokens, then head_dim inside one region
    assert pool.tensor[2, 1, 1, 1 * 4 * 8 + 3 * 8 + 5] == 7.0
    assert pool.tensor.sum() == 7.0


def test_prefix_match_stops_at_first_miss_and_shares_blocks():
    pool = make_pool()
    a = pool.allocate(3)
    pool.commit(a[0], 10)
    pool.commit(a[1], 11)
    assert pool.match_prefix([10, 11, 12]) == a[:2]
    assert pool.match_prefix([99, 11]) == []
    b = pool.allocate(3, reused=a[:2])
    assert b[:2] == a[:2] and b[2] not in a
    pool.release(a)
    # still referenced by b: not free, not evictable
    assert pool.num_free_blocks == 1  # only a[2]
    assert pool.match_prefix([10, 11]) == a[:2]


def test_allocate_returns_none_when_full_and_counts_reused_free_blocks():
    pool = make_pool()
    ids = pool.allocate(4)
    assert pool.allocate(1) is None
    pool.commit(ids[0], 1)
    pool.release(ids)
    # taking the cached block leaves 3 fresh ones
    assert pool.num_allocatable([ids[0]]) == 3
    assert pool.allocate(5, reused=[ids[0]]) is None
    assert pool.allocate(4, reused=[ids[0]]) is not None


def test_lru_eviction_prefers_uncached_then_least_recently_freed():
    pool = make_pool()
    first = pool.allocate(2)
    second = pool.allocate(2)
    for i, block in enumerate(first + second):
        pool.commit(block, 100 + i)
    pool.release(first)
    pool.release(second)
    fresh = pool.allocate(1)
    # first request's tail block was freed earliest
    assert fresh == [first[1]]
    assert pool.num_evicted_blocks == 1
    assert pool.match_prefix([100, 101]) == [first[0]]
    pool.release(fresh)  # uncached now: goes to the front
    assert pool.allocate(1) == fresh
    assert pool.num_evicted_blocks == 1


def test_duplicate_commit_keeps_first_copy_and_reuse_off_never_matches():
    pool = make_pool()
    a, b = pool.allocate(2)
    pool.commit(a, 5)
    pool.commit(b, 5)
    assert pool.match_prefix([5]) == [a]
    off = make_pool(reuse=False)
    (c,) = off.allocate(1)
    off.commit(c, 5)
    assert off.match_prefix([5]) == []


def test_double_release_is_an_error():
    pool = make_pool()
    ids = pool.allocate(1)
    pool.release(ids)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(ids)
