"""The planner walks any number of tiers: the example plugin's ``mmap`` tier (level 4, found
through its entry point, sized by its own option) is planned below G2 and G3, and greedy
outputs with KV loaded from all three equal a full recompute.

The reference executor stands in for TensorRT-LLM (not installable here); the connector,
planner, tiers and in-process discovery are real.
"""

from __future__ import annotations

from collections import Counter

from kvbm_core.transfer import TransferHandler
from kvbm_trtllm.executor import long_document_qa

GPU_BLOCKS = 40


class CountingHandler(TransferHandler):
    """A real handler that counts the blocks it moves."""

    def __init__(self, inner: TransferHandler, counts: Counter) -> None:
        self.src_medium, self.dst_medium = inner.src_medium, inner.dst_medium
        self._inner, self._counts = inner, counts

    def submit(self, jobs, ready=None):
        self._counts[(self.src_medium, self.dst_medium)] += sum(j.num_blocks for j in jobs)
        self._inner.submit(jobs, ready)

    def poll(self):
        return self._inner.poll()

    @property
    def num_pending(self):
        return self._inner.num_pending

    def close(self):
        self._inner.close()


def test_example_tier_below_g2_and_g3_loads_and_matches_recompute(e2e, tmp_path):
    workload = long_document_qa(num_documents=16, document_tokens=160, num_questions=3, seed=12)
    kvbm = {
        "cpu_cache_override_num_blocks": 12,
        "disk_cache_override_num_blocks": 24,
        "disk_cache_dir": str(tmp_path),
        "disable_disk_offload_filter": True,
        "tier_options": {"mmap_num_blocks": 2000, "mmap_dir": str(tmp_path)},
    }
    executor = e2e.build(kvbm, GPU_BLOCKS)
    manager = executor.scheduler.core.wait_ready(10)
    assert [t.name for t in manager.tiers] == ["cpu", "disk", "mmap"], "walked by level"
    assert manager.indexes["mmap"].num_slots == 2000
    counts: Counter = Counter()
    engine = executor.worker.core.engine
    for pair in (("gpu", "mmap"), ("mmap", "gpu"), ("cpu", "disk"), ("disk", "gpu")):
        engine._handlers[pair] = CountingHandler(engine.handler(*pair), counts)
    run = e2e.finish(executor, executor.run(workload))
    assert run.result.outputs == e2e.recompute(workload).outputs
    assert run.stats["failed_transfers"] == 0
    assert counts[("cpu", "disk")] > 0, "write-back: host -> disk, chained"
    assert counts[("gpu", "mmap")] > 0, "no disk -> mmap handler: written from the GPU"
    assert counts[("mmap", "gpu")] > 0, "blocks gone from G2 and G3 load from the fourth tier"
    assert counts[("disk", "gpu")] > 0
    loaded = run.stats["onboard_blocks_h2d"] + run.stats["onboard_blocks_d2d"] + counts[("mmap", "gpu")]
    assert loaded * e2e.tokens_per_block == run.result.num_connector_hit_tokens
