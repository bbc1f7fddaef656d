"""A worker that stops answering leaks nothing on the leader: its jobs time out (bounded by
KVBM_JOB_TIMEOUT_SECS) into failures, through the real connector, in-process discovery and cpu
tier. The worker's completions are dropped on their way to the leader, as in a control-channel
outage longer than its delivery retries.
"""

from __future__ import annotations

import time

import torch

from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_trtllm.trtllm_api import LlmRequestLike, RequestData, SchedulerOutput

TIMEOUT = 0.5
PROMPT = list(range(1, 50))  # 3 full blocks of 16 + 1 token


def _connector(e2e):
    args = e2e.llm_args({"cpu_cache_override_num_blocks": 16, "job_timeout_secs": TIMEOUT})
    leader, worker = KvbmConnectorLeader(args), KvbmConnectorWorker(args)
    pool = torch.zeros(16, 2, 2, 2 * 16 * 16)
    worker.register_kv_caches(pool)
    pool.normal_()
    return leader, worker


def _silence(worker):
    """Drop every completion the worker sends; return the dropped ones."""
    control = worker.core.services.control
    dropped = []
    control.send_to_leader = lambda message: dropped.append(message)
    return dropped


def _store(leader, worker, request_id):
    request = LlmRequestLike(request_id, PROMPT)
    assert leader.get_num_new_matched_tokens(request, 0) == (0, False)
    leader.update_state_after_alloc(request, [0, 1, 2, 3])
    output = SchedulerOutput([RequestData(request_id, PROMPT, [0, 1, 2, 3], 0, len(PROMPT))], [])
    worker.bind_connector_meta(leader.build_connector_meta(output))
    worker.start_load_kv(None)
    worker.wait_for_save(None)
    return request


def _wait_until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_silent_worker_times_out_its_stores_and_nothing_becomes_matchable(e2e):
    leader, worker = _connector(e2e)
    manager = leader.core.wait_ready(10)
    dropped = _silence(worker)
    started = time.monotonic()
    request = _store(leader, worker, 1)
    assert leader.request_finished(request, [0, 1, 2, 3]) is True  # the store is pending
    assert _wait_until(lambda: manager.num_pending_jobs == 0, 10 * TIMEOUT + 5)
    assert time.monotonic() - started >= TIMEOUT, "not before the deadline"
    assert leader.stats.counters["timed_out_jobs"] == 1
    assert _wait_until(lambda: dropped, 5), "the worker did finish: its report was lost"
    del worker.core.services.control.send_to_leader  # the channel is back: the late report arrives
    worker.core.services.control.send_to_leader(dropped[0])
    leader.core.drain_results()
    assert manager.indexes["cpu"].num_used == 0 and manager.num_requests == 0
    assert leader.get_num_new_matched_tokens(LlmRequestLike(2, PROMPT), 0) == (0, False)
    worker.shutdown()
    leader.shutdown()


def test_a_load_a_silent_worker_never_reports_is_recomputed_and_unpinned(e2e):
    leader, worker = _connector(e2e)
    manager = leader.core.wait_ready(10)
    first = _store(leader, worker, 1)
    assert _wait_until(lambda: manager.num_pending_jobs == 0, 5)
    leader.request_finished(first, [0, 1, 2, 3])
    dropped = _silence(worker)
    second = LlmRequestLike(2, PROMPT)
    assert leader.get_num_new_matched_tokens(second, 0) == (48, True)
    leader.update_state_after_alloc(second, [8, 9, 10, 11])
    worker.bind_connector_meta(leader.build_connector_meta(SchedulerOutput([], [])))
    worker.start_load_kv(None)
    second.context_current_position = 48  # where the engine puts a request it loads 48 tokens of
    assert _wait_until(lambda: manager.num_pending_jobs == 0, 10 * TIMEOUT + 5)
    assert leader.stats.counters["timed_out_jobs"] == 1
    assert leader.stats.counters["failed_loads"] == 1
    assert second.context_current_position == 0, "the engine recomputes what did not load"
    assert manager.indexes["cpu"].num_used == 3
    assert all(e.num_pins == 0 for e in manager.indexes["cpu"]._by_hash.values()), "unpinned"
    assert dropped
    worker.shutdown()
    leader.shutdown()
