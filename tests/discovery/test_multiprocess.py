"""A leader (this process) and two worker processes meet through a real etcd, exchange tier
sizes and completions through a real NATS, and a worker killed with SIGKILL is seen gone by
the leader within the lease TTL; a worker that exits cleanly leaves at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbm_discovery import Completions, InstanceInfo, TierSizes, make_etcd_services

from .conftest import TEST_SECRET

pytestmark = pytest.mark.services
TTL = 2
SCRIPT = Path(__file__).with_name("rank_process.py")


def _spawn(rank: int, etcd, nats, namespace: str) -> subprocess.Popen:
    args = [
        sys.executable, str(SCRIPT), "--rank", str(rank), "--num-workers", "2", "--ttl", str(TTL),
        "--etcd", etcd.endpoint, "--nats", nats.url, "--namespace", namespace,
    ]  # fmt: skip
    env = {**os.environ, "KVBM_CONTROL_SECRET": TEST_SECRET}
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_leader_and_two_worker_processes(shared_etcd, shared_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd, shared_nats, leader_worker_init_timeout_secs=30)
    leader = make_etcd_services(config, lease_ttl_secs=TTL)
    inbox = leader.control.leader_inbox()
    leader.discovery.register(InstanceInfo("leader", world_size=2))
    removed: dict[str, float] = {}
    leader.discovery.watch(lambda e: removed.setdefault(e.instance_id, time.monotonic()) if e.kind == "removed" else None)
    workers = [_spawn(rank, shared_etcd, shared_nats, namespace) for rank in range(2)]
    try:
        peers = leader.discovery.wait_for_peers(2)
        assert [p.instance_id for p in peers] == ["leader", "worker-0", "worker-1"]
        assert {p.pid for p in peers[1:]} == {w.pid for w in workers}
        assert all(p.layout is not None and p.bytes_per_block == p.layout.bytes_per_block for p in peers[1:])

        leader.control.broadcast(TierSizes({"cpu": 10}))
        reports = [inbox.get(30) for _ in range(2)]
        assert all(isinstance(r, Completions) for r in reports), [w.stderr.read() for w in workers if w.poll()]
        by_rank = {r.rank: r.results for r in reports}
        assert sorted(by_rank) == [0, 1]
        for rank, results in by_rank.items():
            ok, failed = results
            assert (ok.job_id, ok.ok, ok.num_bytes) == (100 * rank + 1, True, 10 * peers[1].bytes_per_block)
            assert (failed.job_id, failed.ok, failed.error) == (100 * rank + 2, False, f"rank {rank}: disk full")

        workers[1].kill()  # SIGKILL: its lease must lapse on its own
        killed_at = time.monotonic()
        assert leader.discovery.wait_until_gone("worker-1", TTL + 5)
        assert removed["worker-1"] - killed_at <= TTL + 1.5
        assert leader.discovery.get("worker-0") is not None  # the live one keeps its lease

        workers[0].stdin.close()  # clean exit: deregisters and revokes
        assert workers[0].wait(15) == 0
        assert leader.discovery.wait_until_gone("worker-0", 2)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
            for stream in (worker.stdin, worker.stdout, worker.stderr):
                stream.close()
        leader.close()
