"""The issue's attacks on the control plane, against a real etcd and NATS, with the real
connector inside the reference executor (TensorRT-LLM's stand-in): each forgery is published
on the real control subject by a process without the deployment secret, and the engine's
outputs stay equal to a full recompute.

S1 forged restore, S2 forged completions while every real store fails, S3 a hostile message.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from kvbm_core.config import KvbmConfig
from kvbm_discovery.nats_conn import NatsConnection
from kvbm_discovery.testing import EtcdServer, NatsServer, require_binary, wait_until
from kvbm_trtllm.executor import long_document_qa

pytestmark = pytest.mark.services
GPU_BLOCKS = 40
SECRET = "e2e-control-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    etcd = EtcdServer(require_binary("etcd"), tmp_path_factory.mktemp("etcd"))
    nats = NatsServer(require_binary("nats-server"))
    etcd.start()
    nats.start()
    yield etcd, nats
    nats.stop()
    etcd.stop()


def _kvbm(servers, **extra):
    etcd, nats = servers
    return {"discovery": "etcd", "etcd_endpoints": etcd.endpoint, "nats_url": nats.url,
            "control_secret": SECRET, "leader_worker_init_timeout_secs": 60, **extra}  # fmt: skip


def _documents(seed):
    return long_document_qa(num_documents=6, document_tokens=160, num_questions=2, seed=seed)


class Forger:
    """A process on the bus without the secret, publishing raw bytes on the leader's subject."""

    def __init__(self, servers, namespace: str) -> None:
        self.conn = NatsConnection(KvbmConfig(nats_url=servers[1].url, namespace=namespace), "forger")
        self.subject = f"kvbm.{namespace}.control.leader"

    def publish(self, payload: bytes) -> None:
        self.conn.publish_soon(self.subject, payload)

    def close(self) -> None:
        self.conn.close()



def _rejected(executor) -> int:
    core = executor.scheduler.core
    with core.lock:
        core.drain_results()
    return int(core.stats.snapshot()["control_rejected_messages"])


def test_s1_forged_restore_on_the_control_subject_is_not_restored(e2e, servers, tmp_path):
    workload = _documents(seed=21)
    kvbm = _kvbm(servers, cpu_cache_override_num_blocks=200, disk_cache_override_num_blocks=200,
                 disk_cache_dir=str(tmp_path / "disk"))  # fmt: skip
    executor = e2e.build(kvbm, GPU_BLOCKS)
    core = executor.scheduler.core
    manager = core.wait_ready(30)
    forger = Forger(servers, core.config.namespace)
    blocks = ", ".join(f"[{h}, {slot}]" for slot, h in enumerate(range(10**6, 10**6 + 52)))
    for tier in ("disk", "cpu"):
        forger.publish(f'{{"kvbm": 1, "kind": "StoredBlocks", "rank": 0, "tier": "{tier}", "blocks": [{blocks}]}}'.encode())
    assert wait_until(lambda: _rejected(executor) == 2)
    assert manager.indexes["disk"].num_used == 0 and manager.indexes["cpu"].num_used == 0
    run = e2e.finish(executor, executor.run(workload))
    forger.close()
    assert run.result.outputs == e2e.recompute(workload).outputs


class EveryResultFails:
    """The real GPU->host handler with every result reported failed (a broken device)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.src_medium, self.dst_medium = inner.src_medium, inner.dst_medium

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def poll(self):
        return [replace(r, ok=False, error="injected EIO") for r in self.inner.poll()]


def test_s2_forged_completions_are_ignored_and_real_failures_still_count(e2e, servers):
    workload = _documents(seed=22)
    executor = e2e.build(_kvbm(servers, cpu_cache_override_num_blocks=300), GPU_BLOCKS)
    engine = executor.worker.core.engine
    engine._handlers[("gpu", "cpu")] = EveryResultFails(engine.handler("gpu", "cpu"))
    forger = Forger(servers, executor.scheduler.core.config.namespace)
    results = ", ".join(f'{{"job_id": {j}, "ok": true}}' for j in range(1, 301))
    forged = f'{{"kvbm": 1, "kind": "Completions", "rank": 0, "results": [{results}]}}'.encode()
    stop = threading.Event()

    def forge() -> None:
        while not stop.wait(0.003):
            forger.publish(forged)

    thread = threading.Thread(target=forge, daemon=True)
    thread.start()
    try:
        result = executor.run(workload)
    finally:
        stop.set()
        thread.join()
    assert _rejected(executor) > 0
    run = e2e.finish(executor, result)
    forger.close()
    assert run.result.outputs == e2e.recompute(workload).outputs
    assert run.stats["failed_transfers"] > 0, "the real failure reports still arrive"
    assert run.result.num_connector_hit_tokens == 0, "nothing that failed to store is served"
    assert run.stats["host_cache_used_blocks"] == 0


def test_s3_hostile_messages_do_not_stop_the_engine(e2e, servers):
    workload = _documents(seed=23)
    executor = e2e.build(_kvbm(servers, cpu_cache_override_num_blocks=300), GPU_BLOCKS)
    core = executor.scheduler.core
    core.wait_ready(30)
    forger = Forger(servers, core.config.namespace)
    for payload in (b'{"kind":"StoredBlocks","rank":7,"tier":"zzz","blocks":[]}',
                    b'{"kvbm":1,"kind":"StoredBlocks","rank":7,"tier":"zzz","blocks":[]}',
                    b"[" * 100_000, b"\xff" * 5000):  # fmt: skip
        forger.publish(payload)
    assert wait_until(lambda: _rejected(executor) == 4)
    run = e2e.finish(executor, executor.run(workload))
    forger.close()
    assert run.result.outputs == e2e.recompute(workload).outputs
    assert run.result.num_connector_hit_tokens > 0, "the engine kept serving from kvbm's tiers"
