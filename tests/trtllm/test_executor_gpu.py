"""The reference executor on a CUDA GPU: bf16 KV bytes independent of chunking, loads equal recompute.

Skipped where ``torch.cuda.is_available()`` is false (the CI machines).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvbm_trtllm.executor import (
    BlockPool,
    Executor,
    ModelConfig,
    PoolConfig,
    ReferenceModel,
    SequenceChunk,
    long_document_qa,
    multi_turn_chat,
    run_tp,
)
from kvbm_trtllm.trtllm_api import KvCacheConfigLike, LlmArgsLike

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

T = 16
TINY = ModelConfig.tiny(dtype="bfloat16", device="cuda")


def new_pool(config: ModelConfig, num_blocks: int, t: int = T) -> BlockPool:
    return BlockPool(
        PoolConfig(num_blocks=num_blocks, tokens_per_block=t),
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=config.torch_dtype,
        device="cuda",
    )


@pytest.mark.parametrize(
    "config", [TINY, ModelConfig.llama_8b_shape(num_layers=2)], ids=["tiny", "8b-shape-2-layers"]
)
def test_chunking_does_not_change_kv_bytes_on_gpu(config):
    model = ReferenceModel(config)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 500, (301,), generator=g).tolist()
    blocks = list(range(-(-301 // T)))
    results = []
    for sizes in ([301], [5, 130, 1, 100, 65], [64] * 4 + [45]):
        pool = new_pool(config, len(blocks))
        start = 0
        for size in sizes:
            end = start + size
            out = model.forward([SequenceChunk(tokens[start:end], start, blocks, end == 301)], pool)
            start = end
        results.append((pool.tensor.clone(), out))
    for kv, out in results[1:]:
        assert torch.equal(kv, results[0][0])
        assert out == results[0][1]


def test_small_pool_and_connector_loads_equal_recompute_on_gpu(refconn):
    workload = multi_turn_chat(
        num_conversations=3,
        num_turns=3,
        system_tokens=40,
        user_tokens=24,
        assistant_tokens=16,
        max_new_tokens=4,
        seed=7,
    )
    big = PoolConfig(num_blocks=400, tokens_per_block=T, enable_block_reuse=False)
    expected = Executor(TINY, big).run(workload).outputs
    small = PoolConfig(num_blocks=14, tokens_per_block=T)
    for options in ({}, {"async_load": True, "load_delay": 1, "hold_on_finish": True}):
        llm_args = LlmArgsLike(
            model=TINY.name,
            kv_cache_config=KvCacheConfigLike(tokens_per_block=T),
            extra={"refconn": options},
        )
        result = Executor(
            TINY, small, (refconn.RefScheduler, refconn.RefWorker), llm_args=llm_args, overlap=True
        ).run(workload)
        assert result.outputs == expected
        assert result.num_connector_hit_tokens > 0


def test_llama_8b_shape_reuse_equals_recompute():
    config = ModelConfig.llama_8b_shape(num_layers=4)
    workload = long_document_qa(
        num_documents=3,
        document_tokens=384,
        num_questions=2,
        question_tokens=32,
        max_new_tokens=4,
        vocab_size=config.vocab_size,
        seed=3,
    )
    t = 32
    expected = Executor(
        config, PoolConfig(num_blocks=200, tokens_per_block=t, enable_block_reuse=False)
    ).run(workload)
    result = Executor(config, PoolConfig(num_blocks=40, tokens_per_block=t), chunk_size=128).run(
        workload
    )
    assert result.num_device_hit_tokens > 0
    assert result.outputs == expected.outputs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_equals_tp1(refconn):
    config = replace(TINY, num_heads=4, num_kv_heads=2)
    workload = multi_turn_chat(num_conversations=2, num_turns=3, max_new_tokens=3, seed=3)
    pool = PoolConfig(num_blocks=24, tokens_per_block=T)
    options = {"async_load": True, "load_delay": 1, "hold_on_finish": True, "rank_delay": 1}

    def args(tp):
        return LlmArgsLike(
            model=config.name,
            kv_cache_config=KvCacheConfigLike(tokens_per_block=T),
            tensor_parallel_size=tp,
            extra={"refconn": options},
        )

    connector = (refconn.RefScheduler, refconn.RefWorker)
    tp1 = Executor(config, pool, connector, llm_args=args(1)).run(workload)
    tp2 = run_tp(2, workload, config, pool, connector, llm_args=args(2), timeout_s=300)
    assert tp2.outputs == tp1.outputs
    assert tp2.num_connector_hit_tokens == tp1.num_connector_hit_tokens > 0
