"""The in-process backend: leader and workers as threads of one process meet, pass the
barrier, exchange control messages and publish events, with no server."""

from __future__ import annotations

import threading

import pytest

from kvbm_core import JobResult, get_plugin_manager, load_discovery_backend
from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.events import BlockRemoved, BlockStored
from kvbm_discovery import (
    BarrierTimeoutError,
    Completions,
    DiscoveryServices,
    DuplicateInstanceError,
    InProcDiscovery,
    InProcEventSink,
    InstanceInfo,
    TierSizes,
    make_inproc_services,
)


def test_plugin_provides_inproc_and_etcd(namespace: str) -> None:
    pm = get_plugin_manager(blocked=("cpu", "disk"))  # sibling plugins are not this test's concern
    for name in ("inproc", "etcd"):
        assert load_discovery_backend(pm, name).name == name
    services = load_discovery_backend(pm, "inproc").make(KvbmConfig(namespace=namespace))
    assert isinstance(services, DiscoveryServices) and services.backend == "inproc"
    services.close()


def test_bad_namespace_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="KVBM_NAMESPACE='a.b'"):
        make_inproc_services(KvbmConfig(namespace="a.b"))


def test_leader_and_workers_in_threads_meet_and_exchange(namespace: str) -> None:
    config = KvbmConfig(namespace=namespace, leader_worker_init_timeout_secs=10)
    leader = make_inproc_services(config)
    inbox = leader.control.leader_inbox()
    leader.discovery.register(InstanceInfo("leader", world_size=2))
    seen: list[tuple[str, str]] = []
    leader.discovery.watch(lambda e: seen.append((e.kind, e.instance_id)))
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            services = make_inproc_services(config)
            worker_inbox = services.control.worker_inbox(rank)
            services.discovery.register(InstanceInfo("worker", rank=rank, world_size=2, bytes_per_block=64))
            services.discovery.wait_for_peers(2, timeout=10)
            sizes = worker_inbox.get(timeout=10)
            assert sizes == TierSizes({"cpu": 8})
            services.control.send_to_leader(Completions(rank, (JobResult(rank, True, 64),)))
            services.close()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    peers = leader.discovery.wait_for_peers(2, timeout=10)
    assert [p.instance_id for p in peers] == ["leader", "worker-0", "worker-1"]
    leader.control.broadcast(TierSizes({"cpu": 8}))
    got = [inbox.get(timeout=10) for _ in range(2)]
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert sorted(m.rank for m in got) == [0, 1]
    assert all(m.results[0].ok for m in got)
    assert ("added", "worker-0") in seen and ("removed", "worker-1") in seen
    assert [i.instance_id for i in leader.discovery.list_instances()] == ["leader"]
    leader.close()


def test_barrier_timeout_names_who_is_missing(namespace: str) -> None:
    discovery = InProcDiscovery(namespace)
    discovery.register(InstanceInfo("worker", rank=1))
    with pytest.raises(BarrierTimeoutError) as caught:
        discovery.wait_for_peers(3, timeout=0.2)
    assert caught.value.missing == ["leader", "worker-0", "worker-2"]
    assert "missing leader, worker-0, worker-2" in str(caught.value)
    assert "KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS" in str(caught.value)
    discovery.close()


def test_duplicate_rank_is_refused_and_freed_on_close(namespace: str) -> None:
    first, second = InProcDiscovery(namespace), InProcDiscovery(namespace)
    first.register(InstanceInfo("worker", rank=0))
    with pytest.raises(DuplicateInstanceError, match="worker-0 is already registered"):
        second.register(InstanceInfo("worker", rank=0))
    first.close()
    assert second.wait_until_gone("worker-0", 1)
    second.register(InstanceInfo("worker", rank=0)).close()
    assert second.get("worker-0") is None
    second.close()


def test_a_failing_watcher_does_not_stop_others(namespace: str) -> None:
    discovery = InProcDiscovery(namespace)
    seen = []
    discovery.watch(lambda e: 1 / 0)
    discovery.watch(seen.append)
    discovery.register(InstanceInfo("leader"))
    assert [e.instance_id for e in seen] == ["leader"]
    discovery.close()


def test_control_messages_reach_only_their_rank(namespace: str) -> None:
    services = make_inproc_services(KvbmConfig(namespace=namespace))
    inbox0, inbox1 = services.control.worker_inbox(0), services.control.worker_inbox(1)
    services.control.send_to_worker(1, TierSizes({"cpu": 1}))
    assert inbox0.poll() == [] and inbox1.poll() == [TierSizes({"cpu": 1})]
    services.close()


def test_event_sink_is_bounded_and_counts_drops() -> None:
    sink = InProcEventSink("w0", capacity=3)
    sink.publish([BlockStored("cpu", (1,), None, (1, 2), 2), BlockRemoved("cpu", (1,))])
    sink.publish([BlockRemoved("cpu", (2,)), BlockRemoved("cpu", (3,))])
    stats = sink.stats()
    assert (stats.num_published, stats.num_dropped, stats.num_buffered) == (3, 1, 3)
    assert [type(e).__name__ for e in sink.drain()] == ["BlockStored", "BlockRemoved", "BlockRemoved"]
    assert sink.stats().num_sent == 3
    sink.close()
    sink.publish([BlockRemoved("cpu", (4,))])
    assert sink.stats().num_dropped == 2


def test_event_sink_is_thread_safe() -> None:
    sink = InProcEventSink("w0", capacity=10_000)

    def publish() -> None:
        for i in range(1000):
            sink.publish([BlockRemoved("cpu", (i,))])

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sink.drain()) == 4000


def test_barrier_passes_even_if_a_peer_leaves_before_the_waiter_wakes(namespace: str) -> None:
    discovery = InProcDiscovery(namespace)
    discovery.register(InstanceInfo("leader"))
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(discovery.wait_for_peers(1, timeout=5)))
    waiter.start()
    while not discovery._barriers:  # the waiter is parked in the barrier
        threading.Event().wait(0.01)
    with discovery._cond:  # join and leave while the waiter cannot run
        InProcDiscovery(namespace).register(InstanceInfo("worker", rank=0)).close()
    waiter.join(5)
    assert [i.instance_id for i in result[0]] == ["leader", "worker-0"]
    discovery.close()
