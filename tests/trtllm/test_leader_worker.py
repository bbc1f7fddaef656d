"""The connector's leader and worker cores, without an engine: start-up handshake and sizing.

Runs the real in-process discovery and the real cpu tier plugin (a CPU tensor stands in for
the GPU pool, which CI machines do not have).
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from kvbm_core.config import KvbmConfig
from kvbm_core.plugins import get_plugin_manager, load_discovery_backend
from kvbm_runtime.leader import KvbmLeaderCore
from kvbm_runtime.worker import KvbmWorkerCore, WorkerSetup
from kvbm_trtllm.pool_layout import layout_from_pool
from kvbm_trtllm.request_identity import RequestSalts

_namespaces = itertools.count()


def services(config):
    return load_discovery_backend(get_plugin_manager(), config.discovery).make(config)


def config(**values):
    return KvbmConfig.from_mapping(
        {"namespace": f"lw{next(_namespaces)}", "leader_worker_init_timeout_secs": 5, **values}
    )


def test_tier_sizes_count_every_rank_bytes_and_reach_every_worker():
    cfg = config(cpu_cache_gb=0.001)  # 1e6 bytes over the whole deployment
    pools = [torch.zeros(8, 2, 2, 16 * 16 * 2) for _ in range(2)]  # 4 KiB per block per rank
    leader, workers = _started(cfg, pools)
    manager = leader.manager
    bytes_per_block = pools[0][0].numel() * 4 * 2
    assert manager.indexes["cpu"].num_slots == int(1e6 // bytes_per_block)
    for worker in workers:
        assert worker.storages["cpu"].num_slots == manager.indexes["cpu"].num_slots
        worker.close()
    leader.close()


def test_leader_names_the_missing_workers_when_they_never_come():
    cfg = config(cpu_cache_override_num_blocks=4, leader_worker_init_timeout_secs=0.5)
    leader = KvbmLeaderCore(cfg, services(cfg), world_size=2, block_size=16, model_id="m")
    leader.start()
    with pytest.raises(RuntimeError, match="worker-0"):
        leader.wait_ready(5)
    leader.close()


def test_worker_says_what_it_waited_for_without_a_leader():
    cfg = config(cpu_cache_override_num_blocks=4, leader_worker_init_timeout_secs=0.3)
    worker = KvbmWorkerCore(cfg, WorkerSetup(0, 1, 16), services(cfg))
    pool = torch.zeros(4, 1, 2, 16 * 4)
    with pytest.raises(TimeoutError, match="TierSizes"):
        worker.register_kv_caches([pool], layout_from_pool(pool, 16, None))


def test_salt_separates_models_adapters_and_tenants():
    """TensorRT-LLM's own attribute names (bindings.cpp: lora_task_id, cache_salt_id)."""
    cfg = config(cpu_cache_override_num_blocks=4)

    class Request:
        def __init__(self, lora_task_id=None, cache_salt_id=None):
            self.lora_task_id, self.cache_salt_id = lora_task_id, cache_salt_id

    class KvbmNamed:  # what the drifted reference engine used to send: must not count
        lora_name, cache_salt_id = "x", None

    a = RequestSalts(KvbmLeaderCore(cfg, services(cfg), 1, 16, "model-a"))
    b = RequestSalts(KvbmLeaderCore(cfg, services(cfg), 1, 16, "model-b"))
    salts = {
        a.salt_for(Request()),
        b.salt_for(Request()),
        a.salt_for(Request(lora_task_id=3)),
        a.salt_for(Request(cache_salt_id=12345)),
        a.salt_for(Request(lora_task_id=3, cache_salt_id=12345)),
    }
    assert len(salts) == 5
    assert a.salt_for(Request()) == a.salt_for(Request())
    assert a.salt_for(KvbmNamed()) == a.salt_for(Request())
    # A request that tells no salt while RequestData may carry one matches nothing yet.
    a.request_data_has_salt = True
    assert a.salt_for(object()) is None
    assert a.salt_for(object(), "tenant-1") != a.salt_for(Request())


def _started(cfg, pools):
    """A leader and one worker per pool, started as engines start them (concurrently)."""
    world_size = len(pools)
    leader = KvbmLeaderCore(cfg, services(cfg), world_size=world_size, block_size=16, model_id="m")
    leader.start()
    workers = [KvbmWorkerCore(cfg, WorkerSetup(rank, world_size, 16), services(cfg)) for rank in range(world_size)]
    threads = [
        threading.Thread(target=w.register_kv_caches, args=([p], layout_from_pool(p, 16, None)))
        for w, p in zip(workers, pools, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    leader.wait_ready(10)
    return leader, workers


def _send_from_every_rank(workers, tier, per_rank, timeout=10.0):
    from kvbm_discovery.restore_sender import send_restore

    reports = {}

    def send(worker):
        rank = worker.setup.rank
        reports[rank] = send_restore(worker.services.control, worker.inbox, rank, tier, per_rank[rank], timeout,
                                     max_payload_bytes=16 * 1024)  # fmt: skip
    threads = [threading.Thread(target=send, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return reports


def test_leader_restores_chunked_blocks_every_rank_holds_in_the_same_slot(tmp_path):
    cfg = config(cpu_cache_override_num_blocks=8, disk_cache_override_num_blocks=20_000, disk_cache_dir=str(tmp_path / "disk"))
    leader, workers = _started(cfg, [torch.zeros(8, 2, 2, 16 * 4) for _ in range(2)])
    rank0 = {10**6 + i: i for i in range(5000)}
    rank1 = {**rank0, 10**6: 4999, 10**6 + 1: 0}  # two blocks in other slots on rank 1
    del rank1[10**6 + 2]
    reports = _send_from_every_rank(workers, "disk", [rank0, rank1])
    assert all(r.is_complete and r.num_chunks > 1 for r in reports.values())
    index = leader.manager.indexes["disk"]
    assert set(index.readable_hashes()) == set(rank0) - {10**6, 10**6 + 1, 10**6 + 2}
    assert index.slot_of(10**6 + 3) == 3
    for worker in workers:
        worker.close()
    leader.close()


def test_leader_refuses_a_chunked_restore_of_host_memory_and_an_oversized_one(tmp_path):
    cfg = config(cpu_cache_override_num_blocks=64, disk_cache_override_num_blocks=100, disk_cache_dir=str(tmp_path / "d"))
    leader, (worker,) = _started(cfg, [torch.zeros(8, 2, 2, 16 * 4)])
    blocks = {10**6 + i: i for i in range(200)}
    (cpu,) = _send_from_every_rank([worker], "cpu", [blocks], timeout=0.5).values()
    (disk,) = _send_from_every_rank([worker], "disk", [blocks], timeout=0.5).values()
    assert not cpu.is_complete and not disk.is_complete, "nothing refused is acknowledged"
    assert leader.manager.indexes["cpu"].num_used == 0 and leader.manager.indexes["disk"].num_used == 0
    assert leader.stats.snapshot()["restore_failures"] >= 1
    worker.close()
    leader.close()
