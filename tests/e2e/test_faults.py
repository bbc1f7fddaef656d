"""Bad situations: failed stores, corrupt disk blocks, a tier full of pinned blocks, cancelled
loads, unknown ids, empty iterations. Outputs must stay equal to a full recompute.

The reference executor stands in for TensorRT-LLM (not installable here).
"""

from __future__ import annotations

import torch

from kvbm_core.transfer import JobResult, TransferHandler
from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_trtllm.executor import long_document_qa
from kvbm_trtllm.trtllm_api import LlmRequestLike, RequestData, SchedulerOutput

GPU_BLOCKS = 40


class FailingHandler(TransferHandler):
    """Wraps a real handler's media but fails every job, as a broken device would."""

    def __init__(self, inner: TransferHandler) -> None:
        self.src_medium, self.dst_medium = inner.src_medium, inner.dst_medium
        self._failed: list[JobResult] = []

    def submit(self, jobs, ready=None):
        self._failed.extend(JobResult(j.job_id, False, error="injected EIO") for j in jobs)

    def poll(self):
        failed, self._failed = self._failed, []
        return failed

    @property
    def num_pending(self):
        return len(self._failed)


def documents(seed=7):
    return long_document_qa(num_documents=8, document_tokens=160, num_questions=3, seed=seed)


def test_failed_stores_roll_back_and_outputs_stay_right(e2e):
    workload = documents()
    executor = e2e.build({"cpu_cache_override_num_blocks": 500}, GPU_BLOCKS)
    engine = executor.worker.core.engine
    engine._handlers[("gpu", "cpu")] = FailingHandler(engine.handler("gpu", "cpu"))
    run = e2e.finish(executor, executor.run(workload))
    assert run.result.outputs == e2e.recompute(workload).outputs
    assert run.stats["failed_transfers"] > 0
    assert run.result.num_connector_hit_tokens == 0, "nothing failed to store may ever be served"
    assert run.stats["host_cache_used_blocks"] == 0


def test_corrupt_disk_blocks_are_recomputed_and_dropped(e2e, tmp_path):
    workload = documents(seed=8)
    kvbm = {
        "cpu_cache_override_num_blocks": 8,
        "disk_cache_override_num_blocks": 400,
        "disk_cache_dir": str(tmp_path),
        "disable_disk_offload_filter": True,
    }
    first = e2e.run_kvbm(workload, kvbm, GPU_BLOCKS)
    assert first.stats["offload_blocks_h2d"] > 0
    (slots_file,) = tmp_path.glob("*.slots")
    data = bytearray(slots_file.read_bytes())
    for offset in range(8192, len(data), 4096):  # flip a byte in every 4 KiB page past the first slot header
        data[offset] ^= 0xFF
    slots_file.write_bytes(bytes(data))
    second = e2e.run_kvbm(workload, kvbm, GPU_BLOCKS)
    assert second.result.outputs == e2e.recompute(workload).outputs
    assert second.stats["corrupt_blocks"] > 0
    assert second.stats["recomputed_load_tokens"] > 0, "rewound and recomputed, not parked"


def test_tier_full_of_pinned_blocks_skips_stores_without_stalling(e2e):
    workload = documents(seed=9)
    run = e2e.run_kvbm(workload, {"cpu_cache_override_num_blocks": 3}, GPU_BLOCKS, max_batch_size=16)
    assert run.result.outputs == e2e.recompute(workload).outputs
    assert run.stats["store_skipped_full"] > 0


def _connector(e2e, kvbm):
    args = e2e.llm_args(kvbm)
    leader, worker = KvbmConnectorLeader(args), KvbmConnectorWorker(args)
    pool = torch.zeros(16, 2, 2, 2 * 16 * 16, device=e2e.device)
    worker.register_kv_caches(pool)
    return leader, worker, pool


def _iteration(leader, worker, output):
    worker.bind_connector_meta(leader.build_connector_meta(output))
    worker.start_load_kv(None)
    worker.wait_for_save(None)


def test_cancelled_load_holds_blocks_until_copied(e2e):
    leader, worker, pool = _connector(e2e, {"cpu_cache_override_num_blocks": 64})
    prompt = list(range(1, 50))  # 3 full blocks of 16 + 1 token
    first = LlmRequestLike(1, prompt)
    assert leader.get_num_new_matched_tokens(first, 0) == (0, False)
    leader.update_state_after_alloc(first, [0, 1, 2, 3])
    pool[:4].normal_()
    _iteration(leader, worker, SchedulerOutput([RequestData(1, prompt, [0, 1, 2, 3], 0, 49)], []))
    assert worker.get_finished([], []) == ([], [])
    leader.request_finished(first, [0, 1, 2, 3])

    second = LlmRequestLike(2, prompt)
    assert leader.get_num_new_matched_tokens(second, 0) == (48, True)
    leader.update_state_after_alloc(second, [8, 9, 10, 11])
    _iteration(leader, worker, SchedulerOutput([], []))
    # Cancelled while parked: the engine must keep blocks 8..11 until the copy into them is done.
    assert leader.request_finished(second, [8, 9, 10, 11]) is True
    saved, loaded = [], []
    for _ in range(1000):
        done_saving, done_loading = worker.get_finished([2] if not saved else [], [2] if not loaded else [])
        saved += done_saving
        loaded += done_loading
        if saved:
            break
    assert saved == [2] and loaded == [], "reported once, as saved"
    assert torch.equal(pool[8:11], pool[0:3])
    leader.build_connector_meta(SchedulerOutput([], []))  # drains the completions
    assert leader.core.manager.indexes["cpu"].num_used == 3
    assert leader.request_finished(second, []) is False
    worker.shutdown()
    leader.shutdown()


def test_unknown_ids_and_empty_iterations_are_tolerated(e2e):
    leader, worker, _ = _connector(e2e, {"cpu_cache_override_num_blocks": 8})
    for _ in range(3):
        _iteration(leader, worker, SchedulerOutput([], []))
        assert worker.get_finished([], []) == ([], [])
    assert leader.request_finished(LlmRequestLike(404, [1, 2, 3]), [5]) is False
    assert worker.get_finished([404], []) == ([404], [])
    assert worker.get_finished([], []) == ([], []), "each id is returned once"
    worker.shutdown()
    leader.shutdown()
