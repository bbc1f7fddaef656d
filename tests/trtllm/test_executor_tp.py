"""TP=2 on the CPU (gloo, two spawned processes) gives exactly TP=1's outputs.

Each rank holds half the KV heads (its pool shard) and half the attention/MLP weights; the
connector scheduler lives on rank 0; the reference connector's rank 1 reports loads and saves
one ``get_finished`` call later than rank 0, so completion must wait for both ranks.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvbm_trtllm.executor import Executor, ModelConfig, PoolConfig, multi_turn_chat, run_tp
from kvbm_trtllm.trtllm_api import KvCacheConfigLike, LlmArgsLike

T = 16


def test_tp2_with_connector_equals_tp1(refconn):
    model = ModelConfig.tiny(num_heads=4, num_kv_heads=2)
    pool = PoolConfig(num_blocks=12, tokens_per_block=T)
    workload = multi_turn_chat(
        num_conversations=2,
        num_turns=3,
        system_tokens=40,
        user_tokens=24,
        assistant_tokens=16,
        max_new_tokens=3,
        seed=3,
    )
    options = {"async_load": True, "load_delay": 1, "hold_on_finish": True, "rank_delay": 1}
    llm_args = LlmArgsLike(
        model=model.name,
        kv_cache_config=KvCacheConfigLike(tokens_per_block=T),
        tensor_parallel_size=2,
        extra={"refconn": options},
    )
    connector = (refconn.RefScheduler, refconn.RefWorker)
    tp1_args = replace(llm_args, tensor_parallel_size=1)
    tp1 = Executor(model, pool, connector, llm_args=tp1_args, overlap=True).run(workload)
    tp2 = run_tp(
        2, workload, model, pool, connector, llm_args=llm_args, overlap=True, timeout_s=120
    )
    assert tp2.outputs == tp1.outputs
    assert tp2.num_connector_hit_tokens == tp1.num_connector_hit_tokens > 0
    assert tp2.num_device_hit_tokens == tp1.num_device_hit_tokens


def test_tp_size_must_divide_kv_heads():
    with pytest.raises(ValueError, match="must divide num_kv_heads"):
        run_tp(
            2,
            multi_turn_chat(num_conversations=1, num_turns=1),
            ModelConfig.tiny(num_kv_heads=1, num_heads=3),
            PoolConfig(num_blocks=64),
            timeout_s=120,
        )
