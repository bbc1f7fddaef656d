"""TensorRT-LLM as it really drives a connector: identity, failed loads, layout, persistence.

16 tokens per block, a pool of [16, 4, 2, 512] fp16 and model "m", as in the issue that found
each case. TensorRT-LLM cannot be installed here: ``TrtllmRequest`` stands in for the C++
``LlmRequest`` with exactly the attributes its nanobind binding exposes (``bindings.cpp``:
``request_id``, ``prompt_len``, ``get_tokens``, ``lora_task_id``, ``cache_salt_id``,
``context_current_position`` read-write), nothing kvbm-specific. Everything else is real: the
connector, the tiers, the disk files.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvbm_discovery import StoredBlocks
from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker, KvbmLoadError
from kvbm_trtllm.trtllm_api import KvCacheConfigLike, LlmArgsLike, RequestData, SchedulerOutput

T = 16
PROMPT = list(range(1, 81))  # 80 tokens: 5 blocks, 4 loadable (one token is always computed)
_namespaces = itertools.count()
DEVICE = os.environ.get("KVBM_TEST_DEVICE", "cpu")  # as in conftest.py


class TrtllmRequest:
    """The attributes TensorRT-LLM's C++ LlmRequest binds, and no others."""

    def __init__(self, request_id, tokens, lora_task_id=None, cache_salt_id=None):
        self.request_id = request_id
        self._tokens = list(tokens)
        self.prompt_len = len(tokens)
        self.context_current_position = 0
        self.lora_task_id = lora_task_id
        self.cache_salt_id = cache_salt_id
        self.is_generation_only_request = False

    def get_tokens(self, beam):
        return list(self._tokens)


def model_dir(root: Path, num_kv_heads=2, head_dim=16, name="m") -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    config = {"num_attention_heads": 2 * num_kv_heads, "num_key_value_heads": num_kv_heads,
              "head_dim": head_dim, "hidden_size": 64, "num_hidden_layers": 4}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def connector(kvbm, model="m", namespace=None):
    settings = {"namespace": namespace or f"fidelity{next(_namespaces)}", **kvbm}
    args = LlmArgsLike(model=str(model), kv_cache_config=KvCacheConfigLike(tokens_per_block=T),
                       extra={"kvbm": settings})
    leader, worker = KvbmConnectorLeader(args), KvbmConnectorWorker(args)
    pool = torch.zeros(16, 4, 2, 512, dtype=torch.float16, device=DEVICE)
    worker.register_kv_caches(pool)
    return leader, worker, pool


def iteration(leader, worker, output, layers=True):
    worker.bind_connector_meta(leader.build_connector_meta(output))
    worker.start_load_kv(None)
    if layers:
        worker.wait_for_layer_load(0, None)
    worker.wait_for_save(None)


def store_prompt(leader, worker, pool, request_id=1, **identity):
    """Compute PROMPT into blocks 0..4 (random KV) and let kvbm store it."""
    request = TrtllmRequest(request_id, PROMPT, **identity)
    assert leader.get_num_new_matched_tokens(request, 0) == (0, False)
    leader.update_state_after_alloc(request, [0, 1, 2, 3, 4])
    pool[:5].normal_()
    iteration(leader, worker, SchedulerOutput([RequestData(request_id, PROMPT, [0, 1, 2, 3, 4], 0, 80)], []))
    leader.request_finished(request, [0, 1, 2, 3, 4])
    wait_saved(worker, request_id)


def wait_saved(worker, request_id):
    for _ in range(2000):
        saved, _ = worker.get_finished([request_id], [])
        if saved:
            return
        time.sleep(0.001)
    raise AssertionError("store never finished")


def wait_loaded(leader, worker, request_id, seconds=10.0):
    deadline = time.monotonic() + seconds
    first = True
    while time.monotonic() < deadline:
        _, loaded = worker.get_finished([], [request_id] if first else [])
        first = False
        if loaded:
            return True
        time.sleep(0.002)
    return False


def close(*parts):
    for part in parts:
        part.shutdown()


# ---- 1. LoRA and tenant isolation -----------------------------------------------------------


@pytest.mark.parametrize("identity", [{"lora_task_id": 7}, {"cache_salt_id": 123456789}])
def test_lora_and_cache_salt_from_trtllm_attributes_never_share_blocks(identity):
    leader, worker, pool = connector({"cpu_cache_override_num_blocks": 64})
    store_prompt(leader, worker, pool)
    plain = TrtllmRequest(2, PROMPT)
    assert leader.get_num_new_matched_tokens(plain, 0) == (64, True), "the same tenant hits"
    leader.request_finished(plain, [])
    other = TrtllmRequest(3, PROMPT, **identity)
    assert leader.get_num_new_matched_tokens(other, 0) == (0, False), "another adapter/tenant misses"
    close(worker, leader)


def test_request_data_cache_salt_salts_requests_never_looked_up():
    """Block reuse off: no lookup, so the salt comes from RequestData.cache_salt (main)."""
    leader, worker, pool = connector({"cpu_cache_override_num_blocks": 64})

    class NoSaltAttrs:  # an engine whose request object tells no salt
        def __init__(self, request_id):
            self.request_id, self.prompt_len, self.context_current_position = request_id, 80, 0

        def get_tokens(self, beam):
            return list(PROMPT)

    leader.update_state_after_alloc(NoSaltAttrs(1), [0, 1, 2, 3, 4])
    pool[:5].normal_()
    data = RequestData(1, PROMPT, [0, 1, 2, 3, 4], 0, 80, cache_salt="tenant-a")
    iteration(leader, worker, SchedulerOutput([data], []))
    leader.request_finished(NoSaltAttrs(1), [])
    wait_saved(worker, 1)
    leader.build_connector_meta(SchedulerOutput([], []))
    assert leader.core.manager.indexes["cpu"].num_used == 5
    assert leader.get_num_new_matched_tokens(TrtllmRequest(2, PROMPT), 0) == (0, False)
    # The request object tells no salt, RequestData may carry one: nothing matches before it.
    assert leader.get_num_new_matched_tokens(NoSaltAttrs(3), 0) == (0, False)
    close(worker, leader)


# ---- 2/3. failed loads never run on missing KV, never park forever ------------------------


def corrupt_first_slot(directory: Path):
    (slots_file,) = directory.glob("*.slots")
    data = bytearray(slots_file.read_bytes())
    data[4096 + 100] ^= 0xFF  # a payload byte of slot 0 (the header is the first 4 KiB)
    slots_file.write_bytes(bytes(data))


def disk_settings(tmp_path, **more):
    return {"cpu_cache_override_num_blocks": 8, "disk_cache_override_num_blocks": 32,
            "disk_cache_dir": str(tmp_path / "cache"), "disable_disk_offload_filter": True, **more}


def stored_on_disk_then_restarted(tmp_path, **more):
    settings = disk_settings(tmp_path, **more)
    leader, worker, pool = connector(settings)
    store_prompt(leader, worker, pool)
    deadline = time.monotonic() + 5
    while worker.core.storages["disk"].stats["stored_blocks"] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    close(worker, leader)
    corrupt_first_slot(tmp_path / "cache")
    return connector(settings)


def test_failed_sync_load_fails_the_forward_step_instead_of_running_it(tmp_path):
    leader, worker, pool = stored_on_disk_then_restarted(tmp_path, async_load=False)
    request = TrtllmRequest(2, PROMPT)
    assert leader.get_num_new_matched_tokens(request, 0) == (64, False)
    leader.update_state_after_alloc(request, [8, 9, 10, 11, 12])
    worker.bind_connector_meta(leader.build_connector_meta(
        SchedulerOutput([RequestData(2, PROMPT, [8, 9, 10, 11, 12], 0, 16)], [])))
    worker.start_load_kv(None)
    with pytest.raises(KvbmLoadError, match="KVBM_ASYNC_LOAD"):
        worker.wait_for_layer_load(0, None)  # inside TensorRT-LLM's forward step: the batch fails
    worker.wait_for_save(None)  # the next step runs, and stores nothing of the failed one
    assert worker.core.has_deferred_jobs is False
    close(worker, leader)


def test_failed_async_load_is_rewound_and_reported_in_bounded_time(tmp_path):
    leader, worker, pool = stored_on_disk_then_restarted(tmp_path)
    request = TrtllmRequest(2, PROMPT)
    assert leader.get_num_new_matched_tokens(request, 0) == (64, True)
    request.context_current_position = 64  # TensorRT-LLM's setPrepopulatedPromptLen
    leader.update_state_after_alloc(request, [8, 9, 10, 11, 12])
    iteration(leader, worker, SchedulerOutput([], []), layers=False)
    assert wait_loaded(leader, worker, 2), "a failed load must end, not park the request"
    assert request.context_current_position == 0, "recomputed from the first block that failed"
    stats = leader.stats.snapshot()
    assert stats["corrupt_blocks"] >= 1 and stats["recomputed_load_tokens"] == 64
    close(worker, leader)


# ---- 4. layout identity ---------------------------------------------------------------------


def test_restart_with_another_head_layout_serves_nothing_old(tmp_path):
    settings = disk_settings(tmp_path)
    leader, worker, pool = connector(settings, model=model_dir(tmp_path / "a", 2, 16))
    store_prompt(leader, worker, pool)
    close(worker, leader)
    # Same model name and bytes per block, 4 KV heads x head_dim 8 instead of 2 x 16.
    leader, worker, pool = connector(settings, model=model_dir(tmp_path / "a", 4, 8))
    assert worker.core.persisted_blocks()["disk"] == {}
    assert leader.get_num_new_matched_tokens(TrtllmRequest(2, PROMPT), 0) == (0, False)
    close(worker, leader)


def test_same_checkpoint_restarts_with_disk_hits(tmp_path):
    settings = disk_settings(tmp_path)
    leader, worker, pool = connector(settings, model=model_dir(tmp_path / "a"))
    store_prompt(leader, worker, pool)
    close(worker, leader)
    leader, worker, pool = connector(settings, model=model_dir(tmp_path / "a"))
    assert len(worker.core.persisted_blocks()["disk"]) == 5
    assert leader.get_num_new_matched_tokens(TrtllmRequest(2, PROMPT), 0)[0] == 64
    close(worker, leader)


# ---- 5. persistence without shutdown() ------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_fidelity import connector, disk_settings, store_prompt
    from pathlib import Path
    leader, worker, pool = connector(disk_settings(Path({root!r})), namespace="child")
    store_prompt(leader, worker, pool)
    disk = worker.core.storages["disk"]
    while disk.stats["stored_blocks"] < 5:  # the chained host -> disk copy, no engine call
        time.sleep(0.01)
    print("stored", flush=True)  # on disk; the index is not necessarily written yet
    if {wait}:
        time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["interpreter exit", "SIGTERM"])
def test_blocks_stored_before_an_exit_without_shutdown_are_found_again(tmp_path, how):
    script = _CHILD.format(tests=str(Path(__file__).parent), root=str(tmp_path), wait=how == "SIGTERM")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "stored"
    if how == "SIGTERM":
        time.sleep(0.3)  # the host -> disk copy is chained behind the store: no engine call needed
        child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) in (0, -signal.SIGTERM)
    leader, worker, pool = connector(disk_settings(tmp_path))
    assert len(worker.core.persisted_blocks()["disk"]) == 5
    assert leader.get_num_new_matched_tokens(TrtllmRequest(2, PROMPT), 0) == (64, True)
    close(worker, leader)


def test_offloaded_blocks_reach_disk_and_the_index_while_the_engine_is_idle(tmp_path):
    leader, worker, pool = connector(disk_settings(tmp_path))
    store_prompt(leader, worker, pool)  # the engine makes no call after this
    disk = worker.core.storages["disk"]
    deadline = time.monotonic() + 3
    while disk.stats["index_flushes"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert disk.stats["stored_blocks"] == 5
    assert disk.stats["index_flushes"] >= 1, "the index is durable within the flush period (1 s)"
    close(worker, leader)


# ---- 6. the worker delivers only what it verified -------------------------------------------


def test_forged_restore_of_host_slots_is_refused_and_never_served():
    leader, worker, pool = connector({"cpu_cache_override_num_blocks": 64})
    from kvbm_core.hashing import block_hashes

    hashes = block_hashes(PROMPT, T, leader.salts.salt_for(TrtllmRequest(0, PROMPT)))
    forged = StoredBlocks(0, "cpu", {h: i for i, h in enumerate(hashes)})
    leader.services.control.send_to_leader(forged)
    leader.build_connector_meta(SchedulerOutput([], []))
    assert leader.core.manager.indexes["cpu"].num_used == 0, "host memory never survives a restart"
    close(worker, leader)


def test_worker_refuses_a_load_of_host_slots_it_never_wrote():
    leader, worker, pool = connector({"cpu_cache_override_num_blocks": 64})
    store_prompt(leader, worker, pool)
    leader.build_connector_meta(SchedulerOutput([], []))
    # The leader is wrong about slot contents (a bug or a forged completion): simulate it by
    # rewriting the worker's host slot 0 behind its back, under another block's name.
    records = worker.core.records["cpu"]
    index = leader.core.manager.indexes["cpu"]
    slot = index.slot_of(next(iter(index.readable_hashes())))
    records._hashes[slot] ^= 1  # what the worker wrote is no longer what the plan names
    request = TrtllmRequest(2, PROMPT)
    assert leader.get_num_new_matched_tokens(request, 0) == (64, True)
    request.context_current_position = 64
    leader.update_state_after_alloc(request, [8, 9, 10, 11, 12])
    before = pool[8:13].clone()
    iteration(leader, worker, SchedulerOutput([], []), layers=False)
    assert wait_loaded(leader, worker, 2)
    assert worker.core.counters["verify_failures"] >= 1
    assert torch.equal(pool[8:13], before), "a refused job copies nothing to the GPU"
    assert request.context_current_position == 0, "what failed verification is recomputed"
    close(worker, leader)


def test_a_transfer_probe_over_stored_host_slots_makes_their_blocks_unloadable():
    leader, worker, pool = connector({"cpu_cache_override_num_blocks": 64})
    store_prompt(leader, worker, pool)
    leader.build_connector_meta(SchedulerOutput([], []))
    # kvbm bench's probe writes the first host slots, where the prompt's blocks are.
    probe = worker.core.probe_transfer("gpu", "cpu", list(range(10**6, 10**6 + 16)), job_id=10**9)
    assert probe is not None and probe.results and all(r.ok for r in probe.results)
    request = TrtllmRequest(2, PROMPT)
    assert leader.get_num_new_matched_tokens(request, 0) == (64, True), "the leader still lists them"
    request.context_current_position = 64
    leader.update_state_after_alloc(request, [8, 9, 10, 11, 12])
    before = pool[8:13].clone()
    iteration(leader, worker, SchedulerOutput([], []), layers=False)
    assert wait_loaded(leader, worker, 2)
    assert worker.core.counters["verify_failures"] >= 1
    assert torch.equal(pool[8:13], before), "the probe's bytes never reach the GPU as the prompt's"
    assert request.context_current_position == 0
    close(worker, leader)
