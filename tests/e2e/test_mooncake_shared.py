"""G4: a prefix one engine computed is a hit for another engine through Mooncake Store.

Two engine instances (two executors, each with its own leader, worker, host tier and no disk)
share one real store (``mooncake_master`` and a store node on loopback, started here). Engine
B's loads come from the store and its greedy outputs equal a full recompute. Skips locally
without the wheel; fails under CI.
"""

from __future__ import annotations

import os

import pytest

from kvbm_trtllm.executor import long_document_qa

GPU_BLOCKS = 40


@pytest.fixture
def store(tmp_path):
    from kvbm_tiers_mooncake.local_store import LocalMooncake, unavailable_reason

    why = unavailable_reason()
    if why is not None:
        if os.environ.get("CI") or os.environ.get("KVBM_REQUIRE_SERVICES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    store = LocalMooncake(log_dir=tmp_path).start()
    yield store
    store.stop()


def _kvbm(store, namespace: str) -> dict:
    return {
        "cpu_cache_override_num_blocks": 8,
        "disk_cache_gb": 0,
        "tier_options": {**store.options, "mooncake_namespace": namespace},
    }


def _run(e2e, kvbm, workload):
    executor = e2e.build(kvbm, GPU_BLOCKS)
    manager = executor.scheduler.core.wait_ready(10)
    assert [t.name for t in manager.tiers] == ["cpu", "mooncake"]
    return e2e.finish(executor, executor.run(workload))


def test_prefix_computed_by_engine_a_is_a_g4_hit_for_engine_b(e2e, store):
    workload = long_document_qa(num_documents=6, document_tokens=160, num_questions=2, seed=3)
    first = _run(e2e, _kvbm(store, "shared"), workload)
    assert first.stats["failed_transfers"] == 0
    second = _run(e2e, _kvbm(store, "shared"), workload)
    assert second.result.outputs == e2e.recompute(workload).outputs
    assert second.stats["shared_presence_hits"] > 0, "engine B learned A's blocks from the store"
    assert second.stats["failed_transfers"] == 0
    assert second.result.num_connector_hit_tokens > first.result.num_connector_hit_tokens


def test_another_namespace_shares_nothing(e2e, store):
    workload = long_document_qa(num_documents=4, document_tokens=160, num_questions=1, seed=4)
    _run(e2e, _kvbm(store, "tenant-a"), workload)
    other = _run(e2e, _kvbm(store, "tenant-b"), workload)
    assert other.stats.get("shared_presence_hits", 0) == 0
    assert other.result.outputs == e2e.recompute(workload).outputs
