"""Whole runs: outputs under eviction, chunking and overlap equal a full recompute."""

from __future__ import annotations

import pytest

from kvbm_trtllm.executor import (
    NULL_CONNECTOR,
    Executor,
    ModelConfig,
    PoolConfig,
    RequestSpec,
    Workload,
    long_document_qa,
    multi_turn_chat,
    prefix_repetition,
)

T = 16
MODEL = ModelConfig.tiny()


def chat() -> Workload:
    return multi_turn_chat(
        num_conversations=3,
        num_turns=3,
        system_tokens=40,
        user_tokens=24,
        assistant_tokens=16,
        max_new_tokens=4,
        seed=7,
    )


@pytest.fixture(scope="module")
def recompute():
    """Every workload's outputs with a pool far larger than needed and no reuse at all."""
    cache = {}

    def get(workload: Workload):
        if workload.name not in cache:
            pool = PoolConfig(num_blocks=400, tokens_per_block=T, enable_block_reuse=False)
            result = Executor(MODEL, pool).run(workload)
            assert result.num_device_hit_tokens == 0
            cache[workload.name] = result.outputs
        return cache[workload.name]

    return get


@pytest.mark.parametrize(
    "overlap,chunk_size", [(False, None), (True, None), (False, 24), (True, 7)]
)
def test_small_pool_with_null_connector_equals_full_recompute(recompute, overlap, chunk_size):
    workload = chat()
    result = Executor(
        MODEL,
        PoolConfig(num_blocks=14, tokens_per_block=T),
        NULL_CONNECTOR,
        overlap=overlap,
        chunk_size=chunk_size,
    ).run(workload)
    assert result.outputs == recompute(workload)
    assert result.num_evicted_blocks > 0
    assert result.num_device_hit_tokens > 0
    assert all(len(out) == 4 for out in result.outputs.values())
    if chunk_size is not None:
        assert max(s.num_context_tokens for s in result.iterations) <= chunk_size * 3


def test_document_qa_and_prefix_workloads_equal_recompute(recompute):
    for workload in (
        long_document_qa(
            num_documents=3, document_tokens=64, num_questions=2, question_tokens=8, seed=1
        ),
        prefix_repetition(
            num_prefixes=2, prefix_tokens=48, num_requests=6, suffix_tokens=8, seed=2
        ),
    ):
        result = Executor(MODEL, PoolConfig(num_blocks=12, tokens_per_block=T)).run(workload)
        assert result.outputs == recompute(workload)
        assert result.num_device_hit_tokens > 0


def test_result_accounting_and_ttft():
    workload = chat()
    result = Executor(MODEL, PoolConfig(num_blocks=14, tokens_per_block=T)).run(workload)
    assert set(result.requests) == {r.request_id for r in workload.requests}
    for r in result.requests.values():
        assert r.ttft_s > 0
        assert r.first_token_iteration >= r.admitted_iteration >= r.arrival_iteration
        assert r.num_computed_prompt_tokens >= 1
        assert r.num_device_hit_tokens % T == 0
    assert result.num_prompt_tokens == workload.num_prompt_tokens
    assert (
        result.num_computed_prompt_tokens == result.num_prompt_tokens - result.num_device_hit_tokens
    )
    # a turn arrives only after the previous turn of its conversation finished
    by_id = result.requests
    for spec in workload.requests:
        if spec.after is not None:
            assert by_id[spec.request_id].arrival_iteration > by_id[spec.after].finished_iteration
    assert result.summary()["num_requests"] == len(workload.requests)


def test_pool_too_small_for_one_request_is_rejected_up_front():
    workload = Workload("big", (RequestSpec(0, tuple(range(1, 100)), 4),))
    with pytest.raises(ValueError, match="needs 7 blocks .* pool has 4"):
        Executor(MODEL, PoolConfig(num_blocks=4, tokens_per_block=T)).run(workload)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        Executor(MODEL, PoolConfig(num_blocks=40, tokens_per_block=T)).run(
            Workload("oov", (RequestSpec(0, (1, 2, 10_000), 1),))
        )


def test_workloads_are_deterministic_per_seed():
    assert chat() == chat()
    assert multi_turn_chat(seed=1) != multi_turn_chat(seed=2)
    turns = [r for r in chat().requests if r.after is not None]
    for r in turns:
        previous = chat().requests[r.after]
        assert r.prompt[: len(previous.prompt)] == previous.prompt
    docs = long_document_qa(num_documents=2, document_tokens=32, num_questions=2)
    assert docs.requests[0].prompt[:32] == docs.requests[2].prompt[:32]


def test_wall_clock_arrivals_wait_for_their_time():
    workload = Workload(
        "timed",
        (
            RequestSpec(0, tuple(range(1, 30)), 2),
            RequestSpec(1, tuple(range(1, 30)), 2, arrival_s=0.2),
        ),
    )
    result = Executor(MODEL, PoolConfig(num_blocks=20, tokens_per_block=T)).run(workload)
    late = result.requests[1]
    assert late.arrival_s >= 0.2
    assert late.first_token_s > late.arrival_s
    assert late.num_device_hit_tokens == 16  # the first request's full block, reused
    assert result.outputs[0] == result.outputs[1]
