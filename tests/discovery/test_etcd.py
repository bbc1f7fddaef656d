"""The etcd backend against a real etcd on loopback: registration, watch, barrier, leases
lapsing for killed processes, server down at start, server restarted mid-run, foreign keys."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvbm_core.config import ConfigError
from kvbm_discovery import (
    BarrierTimeoutError,
    DuplicateInstanceError,
    InProcDiscovery,
    InstanceInfo,
    ServiceUnavailableError,
    make_etcd_services,
)
from kvbm_discovery.etcd import EtcdDiscovery

pytestmark = pytest.mark.services
TTL = 2


def _kvbm_threads() -> list[str]:
    """kvbm threads besides the one etcd loop a process keeps for all its clients."""
    names = [t.name for t in threading.enumerate() if t.name.startswith("kvbm-")]
    assert names.count("kvbm-etcd") <= 1
    return sorted(n for n in names if n != "kvbm-etcd")


def test_register_list_watch_and_barrier(shared_etcd, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd)
    leader, worker0, worker1 = (EtcdDiscovery(config, lease_ttl_secs=TTL) for _ in range(3))
    events: list[tuple[str, str]] = []
    leader.watch(lambda e: events.append((e.kind, e.instance_id)))
    leader.register(InstanceInfo("leader", world_size=2))
    worker0.register(InstanceInfo("worker", rank=0, world_size=2, bytes_per_block=128))
    barrier = threading.Thread(target=worker0.wait_for_peers, args=(2, 10))
    barrier.start()
    worker1.register(InstanceInfo("worker", rank=1, world_size=2, bytes_per_block=128))
    peers = leader.wait_for_peers(2, timeout=10)
    barrier.join(10)
    assert not barrier.is_alive()
    assert [p.instance_id for p in peers] == ["leader", "worker-0", "worker-1"]
    assert peers[1].bytes_per_block == 128
    worker1.close()  # revokes the lease: gone at once, not after the TTL
    assert leader.wait_until_gone("worker-1", 5)
    assert ("added", "worker-0") in events and ("removed", "worker-1") in events
    for d in (leader, worker0):
        d.close()


def test_barrier_timeout_names_missing_ranks(shared_etcd, namespace, config_factory) -> None:
    with EtcdDiscovery(config_factory(namespace, shared_etcd), lease_ttl_secs=TTL) as discovery:
        discovery.register(InstanceInfo("leader"))
        with pytest.raises(BarrierTimeoutError, match=r"missing worker-1 \(present: leader, worker-0\)"):
            discovery.register(InstanceInfo("worker", rank=0))
            discovery.wait_for_peers(2, timeout=0.5)


def test_duplicate_rank_from_another_live_process_is_refused(shared_etcd, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd)
    with EtcdDiscovery(config, lease_ttl_secs=TTL) as first, EtcdDiscovery(config, lease_ttl_secs=TTL) as second:
        first.register(InstanceInfo("worker", rank=0))
        with pytest.raises(DuplicateInstanceError, match=r"worker-0 is already registered .* by worker-0 \(pid"):
            second.register(InstanceInfo("worker", rank=0))


def test_killed_process_lapses_within_the_lease_ttl(shared_etcd, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd)
    script = (
        "import sys, kvbm_core, kvbm_discovery.etcd as e, kvbm_discovery as k\n"
        f"c = kvbm_core.KvbmConfig(namespace={namespace!r}, etcd_endpoints=({shared_etcd.endpoint!r},), "
        f"control_secret={config.control_secret!r})\n"
        f"d = e.EtcdDiscovery(c, lease_ttl_secs={TTL}); d.register(k.InstanceInfo('worker', rank=5))\n"
        "print('up', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"up\n"
        with EtcdDiscovery(config, lease_ttl_secs=TTL) as leader:
            assert leader.get("worker-5") is not None
            proc.kill()  # SIGKILL: no chance to revoke the lease
            killed_at = time.monotonic()
            assert leader.wait_until_gone("worker-5", TTL + 5)
            # lease lapse + etcd's 0.5 s expiry sweep; never the process's own doing
            assert time.monotonic() - killed_at <= TTL + 1.5
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_server_not_running_is_a_clear_error_fast(namespace, config_factory, dead_port) -> None:
    config = config_factory(namespace, etcd_endpoints=f"127.0.0.1:{dead_port}", discovery="etcd")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match=rf"etcd is not reachable at http://127.0.0.1:{dead_port}") as caught:
        make_etcd_services(config, lease_ttl_secs=TTL)
    assert time.monotonic() - started < 10
    assert "KVBM_DISCOVERY_FALLBACK_INPROC" in str(caught.value)
    assert _kvbm_threads() == []


def test_server_not_running_falls_back_in_process_when_asked(namespace, config_factory, dead_port) -> None:
    config = config_factory(
        namespace, etcd_endpoints=f"127.0.0.1:{dead_port}", discovery="etcd", discovery_fallback_inproc=True
    )
    services = make_etcd_services(config, lease_ttl_secs=TTL)
    assert isinstance(services.discovery, InProcDiscovery)
    assert services.fallbacks and f"127.0.0.1:{dead_port}" in services.fallbacks[0]
    services.discovery.register(InstanceInfo("leader"))
    assert services.discovery.wait_for_peers(0, timeout=1)[0].instance_id == "leader"
    services.close()


def test_first_answering_endpoint_is_used(shared_etcd, namespace, config_factory, dead_port) -> None:
    config = config_factory(namespace, etcd_endpoints=f"127.0.0.1:{dead_port},http://{shared_etcd.endpoint}")
    with EtcdDiscovery(config, lease_ttl_secs=TTL) as discovery:
        discovery.register(InstanceInfo("leader"))
        assert str(discovery._endpoint) == f"http://{shared_etcd.endpoint}"
        assert discovery.get("leader") is not None


def test_bad_etcd_settings_are_config_errors(namespace, config_factory, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KVBM_ETCD_ENDPOINTS entry 'ftp://x:1'"):
        EtcdDiscovery(config_factory(namespace, etcd_endpoints="ftp://x:1"))
    with pytest.raises(ConfigError, match="KVBM_ETCD_CA_CERT="):
        EtcdDiscovery(config_factory(namespace, etcd_ca_cert=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="KVBM_ETCD_USER and KVBM_ETCD_PASSWORD go together"):
        EtcdDiscovery(config_factory(namespace, etcd_user="kvbm"))


def test_restart_with_empty_data_re_registers_and_resyncs(own_etcd, namespace, config_factory) -> None:
    """etcd comes back with no data: both processes' leases are gone, so each must grant a
    new lease and put its keys again, and the watch must resume from a fresh listing."""
    config = config_factory(namespace, own_etcd)
    threads_before = _kvbm_threads()
    leader = EtcdDiscovery(config, lease_ttl_secs=TTL)
    worker = EtcdDiscovery(config, lease_ttl_secs=TTL)
    leader.register(InstanceInfo("leader"))
    worker.register(InstanceInfo("worker", rank=0))
    assert leader.wait_for_peers(1, timeout=5)
    own_etcd.restart(fresh=True)
    deadline = time.monotonic() + 15
    while min(leader.num_reregistrations, worker.num_reregistrations) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leader.num_reregistrations >= 1 and worker.num_reregistrations >= 1
    assert leader.wait_for_peers(1, timeout=10)
    with EtcdDiscovery(config, lease_ttl_secs=TTL) as observer:  # what the server itself holds now
        assert [i.instance_id for i in observer.list_instances()] == ["leader", "worker-0"]
        worker.close()
        assert observer.wait_until_gone("worker-0", 5)
        assert leader.wait_until_gone("worker-0", 5)
    leader.close()
    assert _kvbm_threads() == threads_before  # no loop thread outlives its discovery


def test_watch_reports_members_that_left_while_etcd_was_down(own_etcd, namespace, config_factory) -> None:
    config = config_factory(namespace, own_etcd)
    leader = EtcdDiscovery(config, lease_ttl_secs=TTL)
    worker = EtcdDiscovery(config, lease_ttl_secs=TTL)
    worker.register(InstanceInfo("worker", rank=3))
    appeared, removed = threading.Event(), threading.Event()
    leader.watch(lambda e: appeared.set() if e.instance_id == "worker-3" else None)
    assert appeared.wait(5)
    leader.watch(lambda e: removed.set() if (e.kind, e.instance_id) == ("removed", "worker-3") else None)
    own_etcd.stop()
    worker.close()  # cannot revoke now; its keys vanish with the data on the fresh server
    own_etcd.restart(fresh=True)
    assert removed.wait(10)
    leader.close()


def test_foreign_and_malformed_keys_are_ignored(shared_etcd, namespace, config_factory, caplog) -> None:
    """Only signed values under the lease they were signed for are registrations: plain JSON,
    a lease-less key and junk are skipped and counted, live or in the first snapshot."""
    etcdctl = [require_etcdctl(), "--endpoints", shared_etcd.endpoint]
    prefix = f"kvbm/{namespace}/instances/"
    with EtcdDiscovery(config_factory(namespace, shared_etcd), lease_ttl_secs=TTL) as discovery:
        discovery.register(InstanceInfo("leader"))
        subprocess.run([*etcdctl, "put", prefix + "worker-0", "not json"], check=True, capture_output=True)
        subprocess.run([*etcdctl, "put", prefix + "worker-1", InstanceInfo("worker", rank=1).to_json()],
                       check=True, capture_output=True)  # fmt: skip
        with EtcdDiscovery(config_factory(namespace, shared_etcd), lease_ttl_secs=TTL) as worker2:
            worker2.register(InstanceInfo("worker", rank=2))
            assert discovery.wait_for_peers(0, timeout=5)
            deadline = time.monotonic() + 5
            while discovery.get("worker-2") is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [i.instance_id for i in discovery.list_instances()] == ["leader", "worker-2"]
            assert discovery.get("worker-2").sender == worker2.sender_id
            assert discovery.num_ignored == 2
            assert "ignoring etcd key" in caplog.text and "no lease" in caplog.text
            with EtcdDiscovery(config_factory(namespace, shared_etcd), lease_ttl_secs=TTL) as late:
                assert late.num_ignored == 2 and late.get("worker-2") is not None  # the snapshot path too


def require_etcdctl() -> str:
    import shutil
    from pathlib import Path as P

    found = shutil.which("etcdctl", path=f"{P(sys.executable).parent}")
    if found is None:
        pytest.skip("etcdctl not found next to the interpreter")
    return found


def test_auth_and_a_restart_that_voids_login_tokens(own_etcd, namespace, config_factory) -> None:
    """With authentication on, a restart (same data) voids every token: the process must log
    in again by itself, and its lease (kept by etcd across the restart) goes on."""
    ctl = [require_etcdctl(), "--endpoints", own_etcd.endpoint]
    for step in (["user", "add", "root", "--new-user-password=rootpw"], ["user", "grant-role", "root", "root"],
                 ["auth", "enable"]):  # fmt: skip
        subprocess.run([*ctl, *step], check=True, capture_output=True)
    with pytest.raises(ServiceUnavailableError, match="KVBM_ETCD_USER / KVBM_ETCD_PASSWORD"):
        EtcdDiscovery(config_factory(namespace, own_etcd, etcd_user="root", etcd_password="wrong"), lease_ttl_secs=TTL)
    config = config_factory(namespace, own_etcd, etcd_user="root", etcd_password="rootpw")
    leader, worker = EtcdDiscovery(config, lease_ttl_secs=TTL), EtcdDiscovery(config, lease_ttl_secs=TTL)
    leader.register(InstanceInfo("leader"))
    worker.register(InstanceInfo("worker", rank=0))
    own_etcd.restart(fresh=False)
    time.sleep(TTL + 1)  # longer than the TTL: only a working keep-alive keeps the keys
    with EtcdDiscovery(config, lease_ttl_secs=TTL) as observer:
        assert [i.instance_id for i in observer.list_instances()] == ["leader", "worker-0"]
    worker.close()
    assert leader.wait_until_gone("worker-0", 5)
    leader.close()


def test_etcd_services_without_nats_warn_and_keep_control_in_process(shared_etcd, namespace, config_factory, caplog) -> None:
    from kvbm_discovery import InProcControlChannel

    services = make_etcd_services(config_factory(namespace, shared_etcd), lease_ttl_secs=TTL)
    assert isinstance(services.control, InProcControlChannel)
    assert "KVBM_NATS_URL is not set" in caplog.text
    services.close()
