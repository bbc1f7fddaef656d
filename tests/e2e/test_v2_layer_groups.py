"""kvbm under TensorRT-LLM 1.4's KVCacheManagerV2 (the executor's "v2" profile): outputs equal
a full recompute with two layer groups (a sliding-window group first, Gemma-style, and a
full-attention group), per-chunk allocation and a GPU pool too small for the working set."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_trtllm.executor import Executor, PoolConfig, long_document_qa, multi_turn_chat

GPU_BLOCKS = 40
WINDOW = 24  # tokens: 1.5 blocks of 16, so windows end inside blocks


def swa_model(e2e):
    return replace(e2e.model_config(), sliding_window=WINDOW, sliding_window_layers=(0,))


def run_v2(e2e, workload, kvbm, num_blocks=GPU_BLOCKS, **kwargs):
    model = swa_model(e2e)
    executor = Executor(
        model,
        PoolConfig(num_blocks=num_blocks, tokens_per_block=e2e.tokens_per_block),
        (KvbmConnectorLeader, KvbmConnectorWorker),
        llm_args=e2e.llm_args(kvbm, model),
        trtllm_version="v2",
        **kwargs,
    )
    return e2e.finish(executor, executor.run(workload))


@pytest.fixture(scope="module")
def chat(e2e):
    workload = multi_turn_chat(num_conversations=20, num_turns=4, seed=5)
    return workload, e2e.recompute(workload, swa_model(e2e))


def check(run, baseline, tokens_per_block=16):
    assert run.result.outputs == baseline.outputs
    hit = run.result.num_connector_hit_tokens
    assert hit > 0, "reuse exists in this workload: kvbm must serve some of it"
    loaded = run.stats["onboard_blocks_h2d"] + run.stats["onboard_blocks_d2d"]
    if run.executor.num_paused:
        assert loaded * tokens_per_block >= hit  # a replayed request loads again
    else:
        assert loaded * tokens_per_block == hit
    assert run.stats["failed_transfers"] == 0
    assert run.result.num_evicted_blocks > 0, "the GPU pool must be too small for the workload"


def test_v2_layer_group_outputs_equal_recompute_async(e2e, chat):
    workload, baseline = chat
    run = run_v2(e2e, workload, {"cpu_cache_override_num_blocks": 4000})
    check(run, baseline)
    assert run.executor.layer_groups.windows == (WINDOW, None)
    assert run.executor.worker.region_pool.num_groups == 2


def test_v2_layer_group_outputs_equal_recompute_sync_chunked(e2e, chat):
    workload, baseline = chat
    kvbm = {"cpu_cache_override_num_blocks": 4000, "async_load": False}
    check(run_v2(e2e, workload, kvbm, chunk_size=32), baseline)


def test_v2_layer_group_long_documents_chunked(e2e):
    workload = long_document_qa(num_documents=8, document_tokens=160, num_questions=3, seed=6)
    baseline = e2e.recompute(workload, swa_model(e2e))
    check(run_v2(e2e, workload, {"cpu_cache_override_num_blocks": 4000}, chunk_size=48), baseline)


def _halve_or_drop(request_id: int, offered: int) -> int:
    """V2 honouring less than offered: nothing for every third request, half (whole blocks)
    for every other, all of it otherwise."""
    if request_id % 3 == 0:
        return 0
    if request_id % 2 == 0:
        return offered // 2 // 16 * 16
    return offered


@pytest.mark.parametrize("async_load", [True, False])
def test_v2_partial_honour_and_cancel_load(e2e, chat, async_load):
    workload, baseline = chat
    kvbm = {"cpu_cache_override_num_blocks": 4000, "async_load": async_load}
    # One request at a time, so nothing pauses: every loaded block is then one V2 honoured.
    run = run_v2(e2e, workload, kvbm, max_batch_size=1, honour_offer=_halve_or_drop)
    assert run.executor.num_paused == 0
    check(run, baseline)
    # kvbm matched more than V2 took: the difference was cancelled, never loaded.
    assert run.stats["matched_tokens"] > run.result.num_connector_hit_tokens


@pytest.fixture(scope="module")
def small_chat(e2e):
    workload = multi_turn_chat(num_conversations=8, num_turns=3, seed=7)
    return workload, e2e.recompute(workload, swa_model(e2e))


@pytest.mark.parametrize("with_kvbm", [True, False])
def test_v2_pause_and_replay_under_memory_pressure(e2e, small_chat, with_kvbm):
    """MAX_UTILIZATION: admitted with no reservation, requests are paused (request_reset) and
    replayed when the pool runs out; the outputs are still those of a full recompute."""
    workload, baseline = small_chat
    model = swa_model(e2e)
    pool = PoolConfig(num_blocks=24, tokens_per_block=e2e.tokens_per_block)
    if not with_kvbm:
        executor = Executor(model, pool, trtllm_version="v2", chunk_size=32)
        assert executor.run(workload).outputs == baseline.outputs
        assert executor.num_paused > 0
        return
    kvbm = {"cpu_cache_override_num_blocks": 4000}
    executor = Executor(
        model, pool, (KvbmConnectorLeader, KvbmConnectorWorker),
        llm_args=e2e.llm_args(kvbm, model), trtllm_version="v2", chunk_size=32,
    )
    run = e2e.finish(executor, executor.run(workload))
    assert run.result.outputs == baseline.outputs
    assert executor.num_paused > 0
    assert run.result.num_connector_hit_tokens > 0
    assert run.stats["failed_transfers"] == 0


def test_v2_attention_dp_two_ranks_equal_recompute(e2e):
    """Attention DP over 2 in-process ranks: a kvbm scheduler and worker per rank, each rank
    with its own requests and pool, get_finished local; outputs equal a full recompute."""
    from kvbm_trtllm.executor import run_attention_dp

    model = swa_model(e2e)
    workloads = [multi_turn_chat(num_conversations=6, num_turns=3, seed=s) for s in (11, 12)]
    baselines = [e2e.recompute(w, model) for w in workloads]
    args = e2e.llm_args({"cpu_cache_override_num_blocks": 2000}, model)
    results = run_attention_dp(
        workloads, model, PoolConfig(num_blocks=GPU_BLOCKS, tokens_per_block=e2e.tokens_per_block),
        (KvbmConnectorLeader, KvbmConnectorWorker), llm_args=args, trtllm_version="v2",
    )
    for result, baseline in zip(results, baselines, strict=True):
        assert result.outputs == baseline.outputs
        assert result.num_connector_hit_tokens > 0


def test_attention_dp_rejects_a_connector_without_the_opt_in(e2e):
    from kvbm_trtllm.executor import (
        ConnectorContractError,
        NullConnectorScheduler,
        NullConnectorWorker,
    )

    with pytest.raises(ConnectorContractError, match="supports_attention_dp"):
        Executor(
            e2e.model_config(), PoolConfig(num_blocks=16, tokens_per_block=16),
            (NullConnectorScheduler, NullConnectorWorker), attention_dp_rank=0,
        )
