"""The executor drives a connector as PyExecutor does, and enforces the connector's contract.

Uses the in-memory reference connector in ``executor_refconn.py`` (a real connector that keeps
blocks in a dict; it also asserts the executor's side of the contract on every call).
"""

from __future__ import annotations

import pytest

from kvbm_trtllm.executor import (
    ConnectorContractError,
    Executor,
    ModelConfig,
    PoolConfig,
    RequestSpec,
    Workload,
    multi_turn_chat,
)
from kvbm_trtllm.trtllm_api import KvCacheConfigLike, KvCacheConnectorConfigLike, LlmArgsLike

T = 16
MODEL = ModelConfig.tiny()
SMALL = PoolConfig(num_blocks=12, tokens_per_block=T)


def chat() -> Workload:
    return multi_turn_chat(
        num_conversations=3,
        num_turns=3,
        system_tokens=40,
        user_tokens=24,
        assistant_tokens=16,
        max_new_tokens=3,
        seed=11,
    )


def args(**options) -> LlmArgsLike:
    return LlmArgsLike(
        model=MODEL.name,
        kv_cache_config=KvCacheConfigLike(tokens_per_block=T),
        extra={"refconn": options},
    )


@pytest.fixture(scope="module")
def expected():
    pool = PoolConfig(num_blocks=400, tokens_per_block=T, enable_block_reuse=False)
    return Executor(MODEL, pool).run(chat()).outputs


def run(refconn, workload=None, pool=SMALL, **kwargs):
    options = kwargs.pop("options", {})
    executor = Executor(
        MODEL, pool, (refconn.RefScheduler, refconn.RefWorker), llm_args=args(**options), **kwargs
    )
    return executor, executor.run(workload or chat())


@pytest.mark.parametrize("overlap,chunk_size", [(False, None), (True, 20)])
def test_sync_loads_give_recompute_outputs(refconn, expected, overlap, chunk_size):
    executor, result = run(refconn, overlap=overlap, chunk_size=chunk_size)
    assert result.outputs == expected
    assert result.num_connector_hit_tokens > 0
    assert executor.worker.num_loaded_blocks * T == result.num_connector_hit_tokens
    assert executor.worker.num_register_calls == 1
    assert executor.worker.kv is executor.kv_cache_tensor


@pytest.mark.parametrize("overlap", [False, True])
def test_async_loads_and_held_saves_give_recompute_outputs(refconn, expected, overlap):
    options = {"async_load": True, "load_delay": 2, "hold_on_finish": True, "save_delay": 1}
    executor, result = run(refconn, overlap=overlap, options=options)
    assert result.outputs == expected
    assert result.num_connector_hit_tokens > 0
    assert any(r.is_async_load for r in result.requests.values())
    assert max(s.num_loading for s in result.iterations) > 0
    assert max(s.num_saving for s in result.iterations) > 0
    assert executor.pool.num_free_blocks == executor.pool.num_blocks  # every hold released


def test_connector_claiming_hits_without_loading_changes_outputs(refconn, expected):
    """Negative control: the equality checks above can fail."""
    _, result = run(refconn, options={"skip_loads": True})
    assert result.num_connector_hit_tokens > 0
    assert result.outputs != expected


def test_call_sequence_matches_trtllm(refconn):
    workload = Workload("one", (RequestSpec(5, tuple(range(1, 41)), 4),))
    for overlap, num_forwards in ((False, 4), (True, 5)):
        executor, result = run(refconn, workload, overlap=overlap)
        calls = refconn.CALLS
        names = [name for name, _ in calls]
        assert names.count("get_num_new_matched_tokens") == 1
        assert names.count("update_state_after_alloc") == 1
        assert names.count("build_connector_meta") == num_forwards
        assert calls[0] == ("get_num_new_matched_tokens", (5, 0))
        assert calls[1][0] == "update_state_after_alloc" and len(calls[1][1][1]) == 3  # ceil(40/16)
        (finished,) = [payload for name, payload in calls if name == "request_finished"]
        assert finished[0] == 5
        assert len(finished[1]) == -(-(40 + 4 - (0 if overlap else 1)) // T)
        outputs = [payload for name, payload in calls if name == "build_connector_meta"]
        first = outputs[0].new_requests[0]
        assert first.new_tokens == list(range(1, 41)) and first.num_scheduled_tokens == 40
        gen_tokens = [len(o.cached_requests[0].new_tokens) for o in outputs[1:]]
        assert gen_tokens[0] == (0 if overlap else 1)  # overlap: first generation report is empty
        assert all(o.cached_requests[0].num_scheduled_tokens == 1 for o in outputs[1:])


def test_chunked_first_report_carries_whole_prompt_and_all_blocks(refconn):
    workload = Workload("one", (RequestSpec(0, tuple(range(1, 70)), 2),))
    run(refconn, workload, chunk_size=20)
    outputs = [payload for name, payload in refconn.CALLS if name == "build_connector_meta"]
    first = outputs[0].new_requests[0]
    assert len(first.new_tokens) == 69 and len(first.new_block_ids) == 5
    assert (first.computed_position, first.num_scheduled_tokens) == (0, 20)
    later = [o.cached_requests[0] for o in outputs[1:4]]
    assert [(d.computed_position, d.num_scheduled_tokens) for d in later] == [
        (20, 20),
        (40, 20),
        (60, 9),
    ]
    assert all(d.new_tokens == [] and d.new_block_ids == [] for d in later)


@pytest.mark.parametrize(
    "bad,match",
    [
        ((0, True), r"returned \(0, True\)"),
        ((64, False), "at least one prompt token"),
        ((-1, False), "negative"),
    ],
)
def test_bad_matched_tokens_raise_a_clear_error(refconn, bad, match):
    workload = Workload("one", (RequestSpec(0, tuple(range(1, 65)), 2),))
    with pytest.raises(ConnectorContractError, match=match):
        run(refconn, workload, options={"bad_matched": bad})


def test_get_finished_with_unknown_id_raises_key_error(refconn):
    with pytest.raises(KeyError, match="never passed in"):
        run(refconn, options={"bogus_finished_id": 12345})


def test_connector_that_never_finishes_a_load_is_reported(refconn):
    with pytest.raises(RuntimeError, match="never reports a load or save"):
        run(refconn, options={"async_load": True, "load_delay": 10**9}, max_iterations=300)


def test_connector_named_by_import_strings(refconn):
    spec = KvCacheConnectorConfigLike("executor_refconn", "RefScheduler", "RefWorker")
    executor = Executor(MODEL, SMALL, spec, llm_args=args())
    assert type(executor.worker).__name__ == "RefWorker"
    assert executor.scheduler is not None
