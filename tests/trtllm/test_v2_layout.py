"""kvbm's reading of a KVCacheManagerV2 KvCacheLayout, and the executor's V2 bring-up checks."""

from __future__ import annotations

import pytest
import torch

from kvbm_trtllm.executor import (
    ConnectorContractError,
    Executor,
    ModelConfig,
    PoolConfig,
    multi_turn_chat,
)
from kvbm_trtllm.executor.null_connector import NullConnectorScheduler, NullConnectorWorker
from kvbm_trtllm.kv_cache_layout import (
    KvCacheBufferRef,
    KvCacheLayerGroupLayout,
    KvCacheLayout,
    KvCacheRegion,
    valid_page_slots,
)
from kvbm_trtllm.v2_layout import (
    check_mapping,
    primary_group_index,
    region_pool,
    registration_ranges,
)


def group(gid, window, base, size=64, stride=128, num_slots=4, owner=None):
    region = KvCacheRegion(base, size, stride, num_slots, (KvCacheBufferRef(gid, "key"),), owner=owner)
    return KvCacheLayerGroupLayout(gid, (gid,), window, (region,))


def test_valid_page_slots_drops_bad_page_index():
    assert list(valid_page_slots([-1, -1, 7, 3])) == [(2, 7), (3, 3)]


def test_primary_group_is_the_first_full_attention_one_and_all_sliding_is_refused():
    assert primary_group_index(KvCacheLayout(16, (group(0, 512, 0), group(1, None, 4096)))) == 1
    with pytest.raises(NotImplementedError, match=r"group 0 \(window 512\)"):
        primary_group_index(KvCacheLayout(16, (group(0, 512, 0),)))


def test_registrations_never_span_two_pool_mappings():
    layout = KvCacheLayout(16, (group(0, None, 0, num_slots=8),), gpu_pool_mapping_bytes=256)
    ranges = registration_ranges(layout)
    # One region: 8 slots of 64 bytes every 128 bytes, [0, 960), cut at every 256 bytes.
    assert ranges == [(0, 256), (256, 512), (512, 768), (768, 960)]
    check_mapping(layout)
    crossing = KvCacheLayout(16, (group(0, None, 0, size=96, stride=96, num_slots=4),), 256)
    with pytest.raises(ValueError, match="crosses a 256-byte GPU pool mapping"):
        check_mapping(crossing)


def test_region_pool_puts_the_primary_group_first():
    tensors = [torch.zeros(4, 2, 32) for _ in range(2)]
    groups = tuple(
        group(g, w, t.data_ptr(), size=256, stride=256, owner=t)
        for g, (w, t) in enumerate(zip((64, None), tensors, strict=True))
    )
    pool = region_pool(KvCacheLayout(16, groups))
    assert [r.group for r in pool.regions] == [0, 1]
    assert pool.regions[0].rows.data_ptr() == tensors[1].data_ptr()  # the full-attention group
    assert pool.layout.bytes_per_block == 512


def test_v2_flat_only_scheduler_is_rejected_with_two_layer_groups():
    class FlatOnly(NullConnectorScheduler):
        pass

    model = ModelConfig.tiny(sliding_window=8, sliding_window_layers=(0,))
    with pytest.raises(ConnectorContractError, match="update_state_after_alloc_by_layer_group"):
        Executor(model, PoolConfig(num_blocks=32, tokens_per_block=4),
                 (FlatOnly, NullConnectorWorker), trtllm_version="v2")


def test_v2_single_pool_fallback_for_a_one_group_cache():
    """Without windows V2 has one layer group; a flat connector gets register_kv_caches."""
    seen = []

    class Worker(NullConnectorWorker):
        def register_kv_caches(self, kv_cache_tensor):
            seen.append(kv_cache_tensor.shape)

    ex = Executor(ModelConfig.tiny(), PoolConfig(num_blocks=256, tokens_per_block=4),
                  (NullConnectorScheduler, Worker), trtllm_version="v2", chunk_size=8)
    ex.run(multi_turn_chat(num_conversations=2, num_turns=2))
    assert seen == [ex.pool.tensor.shape]


def test_v1_refuses_a_connector_with_several_window_sizes():
    model = ModelConfig.tiny(sliding_window=8, sliding_window_layers=(0,))
    with pytest.raises(ConnectorContractError, match="multiple window sizes"):
        Executor(model, PoolConfig(num_blocks=32, tokens_per_block=4),
                 (NullConnectorScheduler, NullConnectorWorker), trtllm_version="main")
