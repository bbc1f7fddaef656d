"""The authenticated control plane against real servers: what reaches an inbox or the
membership view is signed with the deployment secret, sent by the process registered for the
rank it claims, never a replay, and bounded; everything else is dropped and counted.

Waits are for events (a counter moving), bounded by a deadline; no assertion is on timing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvbm_core import JobResult
from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_discovery import Completions, InstanceInfo, StoredBlocks, TierSizes, WorkerError, encode
from kvbm_discovery.envelope import seal
from kvbm_discovery.etcd import EtcdDiscovery
from kvbm_discovery.nats_control import NatsControlChannel
from kvbm_discovery.services import make_etcd_services
from kvbm_discovery.testing import wait_until

pytestmark = pytest.mark.services
TTL = 2
FORGED = b'{"kvbm": 1, "kind": "StoredBlocks", "rank": 0, "tier": "disk", "blocks": [[11, 0], [12, 1]]}'



def _leader_subject(namespace: str) -> str:
    return f"kvbm.{namespace}.control.leader"


@pytest.fixture
def channels(shared_nats, namespace, config_factory):
    config = config_factory(namespace, nats=shared_nats)
    leader, worker = NatsControlChannel(config), NatsControlChannel(config)
    yield leader, worker, leader.leader_inbox()
    worker.close()
    leader.close()


def test_unsigned_forgery_on_the_real_subject_is_dropped_and_counted(channels, namespace) -> None:
    leader, worker, inbox = channels
    worker.connection.publish_soon(_leader_subject(namespace), FORGED)
    assert wait_until(lambda: leader.num_rejected == 1)
    worker.send_to_leader(WorkerError(0, "genuine"))
    assert inbox.get(5) == WorkerError(0, "genuine"), "the channel goes on after a forgery"
    assert inbox.get(0.1) is None
    assert inbox.take_tallies().num_rejected == 1


def test_wrong_secret_is_dropped(shared_nats, channels, namespace, config_factory) -> None:
    leader, _, inbox = channels
    intruder = NatsControlChannel(config_factory(namespace, nats=shared_nats, control_secret="another-secret-0123456789"),
                                  delivery_timeout_secs=0.5)  # fmt: skip
    intruder.send_to_leader(StoredBlocks(0, "disk", {11: 0}))
    assert wait_until(lambda: leader.num_rejected >= 1)
    assert inbox.get(0.2) is None
    intruder.close()


def test_a_replayed_genuine_message_is_refused(channels, namespace) -> None:
    leader, worker, inbox = channels
    captured: list[bytes] = []

    async def capture() -> None:
        async def keep(msg) -> None:
            captured.append(msg.data)

        await worker.connection.nc.subscribe(_leader_subject(namespace), cb=keep)
        await worker.connection.nc.flush()

    worker.connection.call(capture)
    worker.send_to_leader(Completions(0, (JobResult(1, False, error="EIO"),)))
    assert isinstance(inbox.get(5), Completions)
    assert wait_until(lambda: captured)
    worker_subject = f"kvbm.{namespace}.control.worker.0"
    replay = captured[0]
    reply = worker.connection.call(lambda: worker.connection.nc.request(_leader_subject(namespace), replay, timeout=2))
    assert reply.data == b"ok", "a repeat is acknowledged (its sender may have missed the first ack)"
    assert inbox.get(0.2) is None and leader.num_duplicates == 1
    worker_inbox = leader.worker_inbox(0)
    worker.connection.publish_soon(worker_subject, replay)  # moved to another subject
    assert wait_until(lambda: leader.num_rejected == 1) and worker_inbox.get(0.1) is None


def test_a_restarted_sender_is_accepted_from_sequence_one(shared_nats, channels, namespace, config_factory) -> None:
    leader, worker, inbox = channels
    for i in range(3):
        worker.send_to_leader(WorkerError(0, f"before {i}"))
    assert [inbox.get(5).error for _ in range(3)] == ["before 0", "before 1", "before 2"]
    restarted = NatsControlChannel(config_factory(namespace, nats=shared_nats))  # a new incarnation
    restarted.send_to_leader(WorkerError(0, "after"))
    assert inbox.get(5) == WorkerError(0, "after")
    restarted.close()


@pytest.mark.parametrize("payload", [b"[" * 100_000, b'{"a":' * 100_000, b'"' + b"x" * (9 * 1024 * 1024)])
def test_deep_and_oversized_payloads_are_dropped_and_counted(payload: bytes) -> None:
    """Checked on the receiving side directly: nats-server itself refuses a payload over 1 MB."""
    from kvbm_discovery.admission import REJECT, Admission

    admission = Admission(b"s" * 32)
    subject = "kvbm.t.control.leader"
    assert admission.check(seal(b"s" * 32, "w", 1, subject, payload), subject, to_leader=True).outcome == REJECT
    assert admission.num_rejected == 1


def test_a_deeply_nested_signed_message_over_nats_is_dropped(channels, namespace) -> None:
    leader, worker, inbox = channels
    deep = seal(worker.secret, worker.sender_id, 1, _leader_subject(namespace), b"[" * 100_000)
    worker.connection.publish_soon(_leader_subject(namespace), deep)
    assert wait_until(lambda: leader.num_rejected == 1)
    worker.send_to_leader(WorkerError(0, "still here"))
    assert inbox.get(5) == WorkerError(0, "still here")


def test_full_inbox_refuses_and_counts_and_the_sender_retries(channels) -> None:
    leader, worker, inbox = channels
    inbox.max_messages = 2
    for i in range(3):
        worker.send_to_leader(WorkerError(0, str(i)))
    assert wait_until(lambda: inbox.num_dropped >= 1)
    assert [m.error for m in inbox.poll()] == ["0", "1"]
    assert inbox.get(5) == WorkerError(0, "2"), "refused while full, delivered once there is room"


# ---- senders checked against etcd --------------------------------------------------------


def test_rank_must_come_from_the_process_registered_for_it(shared_etcd, shared_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd, shared_nats)
    leader, worker, insider = (make_etcd_services(config, lease_ttl_secs=TTL) for _ in range(3))
    inbox = leader.control.leader_inbox()
    worker.discovery.register(InstanceInfo("worker", rank=0))
    leader.discovery.register(InstanceInfo("leader"))
    assert wait_until(lambda: leader.discovery.get("worker-0") is not None)
    # Holds the secret but registered nothing as rank 0: claims rank 0's completions.
    insider.control.send_to_leader(Completions(0, tuple(JobResult(j, True) for j in range(1, 50))))
    assert wait_until(lambda: leader.control.num_rejected >= 1)
    genuine = Completions(0, (JobResult(7, False, error="EIO", finished_at=1.0),))
    worker.control.send_to_leader(genuine)
    assert inbox.get(5) == genuine
    assert inbox.get(0.2) is None
    for services in (insider, worker, leader):
        services.close()


def test_forged_tier_sizes_while_a_worker_starts_never_reach_it(shared_etcd, shared_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd, shared_nats)
    leader, worker, insider = (make_etcd_services(config, lease_ttl_secs=TTL) for _ in range(3))
    inbox = worker.control.worker_inbox(0)
    leader.discovery.register(InstanceInfo("leader"))
    assert wait_until(lambda: worker.discovery.get("leader") is not None)
    subject = f"kvbm.{namespace}.control.worker.0"
    insider.control.connection.publish_soon(subject, encode(TierSizes({"cpu": 0})))  # unsigned
    insider.control.broadcast(TierSizes({"cpu": 0}))  # signed, but not by the leader
    assert wait_until(lambda: worker.control.num_rejected >= 2)
    leader.control.send_to_worker(0, TierSizes({"cpu": 64}))
    assert inbox.get(5) == TierSizes({"cpu": 64})
    assert inbox.get(0.2) is None
    for services in (insider, worker, leader):
        services.close()


# ---- etcd values -------------------------------------------------------------------------


def _etcdctl(etcd, *args: str) -> None:
    ctl = Path(sys.executable).with_name("etcdctl")
    if not ctl.exists():
        pytest.skip("etcdctl not found next to the interpreter")
    subprocess.run([str(ctl), "--endpoints", etcd.endpoint, *args], check=True, capture_output=True)


def test_a_value_nested_100000_deep_is_skipped_and_counted(shared_etcd, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd)
    with EtcdDiscovery(config, lease_ttl_secs=TTL) as watching:
        _etcdctl(shared_etcd, "put", f"kvbm/{namespace}/instances/worker-0", "[" * 100_000)
        assert wait_until(lambda: watching.num_ignored == 1)
        with EtcdDiscovery(config, lease_ttl_secs=TTL) as late:  # a new engine starts normally
            assert late.num_ignored == 1
            late.register(InstanceInfo("worker", rank=1))
            assert wait_until(lambda: watching.get("worker-1") is not None), "the watch goes on"


def test_a_lease_less_key_does_not_block_registration(shared_etcd, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd)
    _etcdctl(shared_etcd, "put", f"kvbm/{namespace}/instances/worker-0", InstanceInfo("worker").to_json().decode())
    with EtcdDiscovery(config, lease_ttl_secs=TTL) as leader, EtcdDiscovery(config, lease_ttl_secs=TTL) as worker:
        assert leader.get("worker-0") is None, "a key without a lease is nobody's registration"
        worker.register(InstanceInfo("worker", rank=0))
        assert wait_until(lambda: leader.get("worker-0") is not None)
        assert leader.get("worker-0").sender == worker.sender_id


def test_a_signed_value_copied_to_another_key_is_skipped(shared_etcd, namespace, config_factory) -> None:
    config = config_factory(namespace, shared_etcd)
    with EtcdDiscovery(config, lease_ttl_secs=TTL) as observer, EtcdDiscovery(config, lease_ttl_secs=TTL) as worker:
        worker.register(InstanceInfo("worker", rank=0))
        copied = worker._sealed(InstanceInfo("worker", rank=0))
        lease = f"{worker._lease_id:x}"
        _etcdctl(shared_etcd, "put", "--lease", lease, f"kvbm/{namespace}/instances/worker-3", copied.decode())
        assert wait_until(lambda: observer.num_ignored >= 1) and observer.get("worker-3") is None


# ---- the secret and the insecure switch --------------------------------------------------


def test_a_missing_secret_is_a_config_error_naming_both_settings(namespace) -> None:
    etcd = KvbmConfig(namespace=namespace, discovery="etcd", nats_url="nats://127.0.0.1:1")
    for make in (lambda: make_etcd_services(etcd, lease_ttl_secs=TTL), lambda: NatsControlChannel(etcd)):
        with pytest.raises(ConfigError, match="KVBM_CONTROL_SECRET .*KVBM_CONTROL_SECRET_FILE"):
            make()


def test_the_insecure_switch_runs_unsigned_with_one_loud_warning(shared_etcd, shared_nats, namespace, caplog) -> None:
    from kvbm_discovery import control_secret as module

    module._warned.clear()
    config = KvbmConfig(namespace=namespace, discovery="etcd", etcd_endpoints=(shared_etcd.endpoint,),
                        nats_url=shared_nats.url, control_insecure=True)  # fmt: skip
    leader, worker = (make_etcd_services(config, lease_ttl_secs=TTL) for _ in range(2))
    assert leader.control.secret is None
    worker.discovery.register(InstanceInfo("worker", rank=0))
    assert wait_until(lambda: leader.discovery.get("worker-0") is not None)
    inbox = leader.control.leader_inbox()
    worker.control.send_to_leader(WorkerError(0, "unsigned"))
    assert inbox.get(5) == WorkerError(0, "unsigned")
    assert caplog.text.count("UNSIGNED") == 1
    for services in (worker, leader):
        services.close()
    signed = NatsControlChannel(KvbmConfig(namespace=namespace, nats_url=shared_nats.url,
                                           control_secret="kvbm-test-secret-0123456789abcdef"))  # fmt: skip
    signed_inbox = signed.leader_inbox()
    unsigned = NatsControlChannel(config, delivery_timeout_secs=0.5)
    unsigned.send_to_leader(WorkerError(0, "unsigned"))
    assert wait_until(lambda: signed.num_rejected >= 1) and signed_inbox.get(0.1) is None
    unsigned.close()
    signed.close()
