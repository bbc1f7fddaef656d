"""TP=2: two rank processes (gloo), each moving only its KV-head shard; the leader on rank 0
meets the workers through a real etcd and gets their completions over a real NATS server.

The reference executor stands in for TensorRT-LLM (not installable here).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvbm_discovery.testing import EtcdServer, NatsServer, require_binary
from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_trtllm.executor import PoolConfig, multi_turn_chat, run_tp

pytestmark = pytest.mark.services


def test_tp2_outputs_equal_recompute_through_etcd_and_nats(e2e, tmp_path):
    etcd = EtcdServer(require_binary("etcd"), tmp_path)
    nats = NatsServer(require_binary("nats-server"))
    etcd.start()
    nats.start()
    try:
        workload = multi_turn_chat(num_conversations=6, num_turns=3, seed=12)
        baseline = e2e.recompute(workload)
        kvbm = {
            "cpu_cache_override_num_blocks": 400,
            "disk_cache_override_num_blocks": 400,
            "disk_cache_dir": str(tmp_path / "disk"),
            "disable_disk_offload_filter": True,
            "discovery": "etcd",
            "etcd_endpoints": etcd.endpoint,
            "nats_url": nats.url,
            "control_secret": "tp2-test-control-secret-0123456789",
            "leader_worker_init_timeout_secs": 60,
        }
        args = replace(e2e.llm_args(kvbm), tensor_parallel_size=2)
        pool = PoolConfig(num_blocks=24, tokens_per_block=e2e.tokens_per_block)
        result = run_tp(
            2, workload, e2e.model_config(), pool, (KvbmConnectorLeader, KvbmConnectorWorker),
            llm_args=args, timeout_s=240,
        )
        assert result.outputs == baseline.outputs
        assert result.num_connector_hit_tokens > 0
    finally:
        nats.stop()
        etcd.stop()
