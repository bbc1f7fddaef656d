"""The runtime's leader and worker cores with only kvbm-core and kvbm-discovery installed.

No engine, no torch, no tier plugin: a numpy array stands in for the GPU pool and the cores
meet through the real in-process discovery backend (the ``kvbm_discovery`` plugin).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading

import numpy as np

from kvbm_core.config import KvbmConfig
from kvbm_core.layout import KvLayout
from kvbm_core.messages import Completions, StoredBlocks
from kvbm_core.plugins import load_discovery_backend, shared_plugin_manager
from kvbm_core.transfer import JobResult
from kvbm_runtime import KvbmLeaderCore, KvbmWorkerCore, RuntimeServices, SaltInputs, WorkerSetup

_namespaces = itertools.count()
LAYOUT = KvLayout(num_layers=2, tokens_per_block=4, num_kv_heads=1, head_dim=8, dtype="float16")


def config(**values):
    return KvbmConfig.from_mapping(
        {"namespace": f"rt{next(_namespaces)}", "leader_worker_init_timeout_secs": 5, **values}
    )


def services(cfg):
    return load_discovery_backend(shared_plugin_manager(cfg.disabled_plugins), cfg.discovery).make(cfg)


def start_pair(cfg):
    leader = KvbmLeaderCore(cfg, services(cfg), world_size=1, block_size=4, model_id="m")
    leader.start()
    worker = KvbmWorkerCore(cfg, WorkerSetup(0, 1, 4), services(cfg))
    pool = np.zeros((6, 2, 2, 4 * 8), dtype=np.float16)
    thread = threading.Thread(target=worker.register_kv_caches, args=([pool], LAYOUT))
    thread.start()
    manager = leader.wait_ready(10)
    thread.join(10)
    assert not thread.is_alive(), "the worker never got the leader's tier sizes"
    return leader, worker, manager


def test_runtime_imports_no_engine_no_adapter_and_no_torch():
    code = (
        "import kvbm_runtime, kvbm_runtime.leader, kvbm_runtime.worker, sys; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'tensorrt_llm', 'kvbm_trtllm', 'kvbm_tiers_cpu', 'kvbm_tiers_disk')]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cores_meet_and_size_no_tier_when_none_is_enabled():
    leader, worker, manager = start_pair(config())
    assert dict(manager.indexes) == {}
    assert set(worker.storages) == {"gpu"} and worker.storages["gpu"].num_slots == 6
    assert worker.get_finished([], []) == ([], [])
    worker.close()
    leader.close()


def test_leader_rejects_messages_from_ranks_outside_its_world():
    leader, worker, _ = start_pair(config())
    control = leader.services.control
    control.send_to_leader(Completions(rank=5, results=(JobResult(1, True),)))
    control.send_to_leader(StoredBlocks(rank=0, tier="nowhere", blocks={1: 0}))
    with leader.lock:
        leader.drain_results()
    assert leader.stats.snapshot()["control_rejected_messages"] == 1  # the unknown tier is ignored
    worker.close()
    leader.close()


def test_salt_separates_models_adapters_and_tenants():
    cfg = config()
    a = KvbmLeaderCore(cfg, services(cfg), 1, 4, "model-a")
    b = KvbmLeaderCore(cfg, services(cfg), 1, 4, "model-b")
    inputs = [SaltInputs(), SaltInputs("task:3"), SaltInputs(None, "id:7"), SaltInputs("task:3", "id:7")]
    salts = {a.salt_for(i) for i in inputs} | {b.salt_for(SaltInputs())}
    assert len(salts) == 5
    assert a.salt_for(SaltInputs("task:3")) == a.salt_for(SaltInputs("task:3"))


def test_discovery_services_satisfy_the_runtime_protocol():
    cfg = config()
    built = services(cfg)
    assert isinstance(built, RuntimeServices)

    class NoControl:
        discovery = built.discovery

        def make_event_sink(self, worker_id="0", capacity=1):
            raise AssertionError("not called")

    assert not isinstance(NoControl(), RuntimeServices)
    built.close()
