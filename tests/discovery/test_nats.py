"""NATS against a real nats-server on loopback: the control channel between separate
connections (as between processes), the event sink and listener, malformed messages,
server down at start, and a server restart with events buffered meanwhile."""

from __future__ import annotations

import threading
import time

import pytest

from kvbm_core import JobResult
from kvbm_core.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvbm_discovery import (
    Completions,
    InProcEventSink,
    ServiceUnavailableError,
    TierSizes,
    WorkerError,
    make_inproc_services,
)
from kvbm_discovery.nats_control import NatsControlChannel
from kvbm_discovery.nats_events import NatsEventListener, NatsEventSink
from kvbm_discovery.testing import wait_until

pytestmark = pytest.mark.services


def _kvbm_threads() -> list[str]:
    """kvbm threads besides the one etcd loop a process keeps for all its clients."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("kvbm-") and t.name != "kvbm-etcd")



def test_control_channel_between_connections(shared_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, nats=shared_nats)
    leader, worker0, worker1 = (NatsControlChannel(config) for _ in range(3))
    leader_inbox = leader.leader_inbox()
    inbox0, inbox1 = worker0.worker_inbox(0), worker1.worker_inbox(1)
    leader.broadcast(TierSizes({"cpu": 64, "disk": 256}))
    leader.send_to_worker(1, TierSizes({"cpu": 1}))
    assert inbox0.get(5) == TierSizes({"cpu": 64, "disk": 256})
    assert inbox1.get(5) == TierSizes({"cpu": 64, "disk": 256})
    assert inbox1.get(5) == TierSizes({"cpu": 1})
    assert inbox0.get(0.2) is None  # the unicast went to rank 1 only
    batch = tuple(JobResult(i, i % 2 == 0, 4096) for i in range(50))
    for rank, channel in ((0, worker0), (1, worker1)):
        channel.send_to_leader(Completions(rank, batch))
    worker1.send_to_leader(WorkerError(1, "pinned allocation failed"))
    got = [leader_inbox.get(5) for _ in range(3)]
    assert sorted((type(m).__name__, m.rank) for m in got) == [("Completions", 0), ("Completions", 1), ("WorkerError", 1)]
    assert all(m.results == batch for m in got if isinstance(m, Completions))
    for channel in (leader, worker0, worker1):
        channel.close()


def test_malformed_and_foreign_control_messages_are_ignored(shared_nats, namespace, config_factory, caplog) -> None:
    config = config_factory(namespace, nats=shared_nats)
    leader, sender = NatsControlChannel(config), NatsControlChannel(config)
    inbox = leader.leader_inbox()
    subject = f"kvbm.{namespace}.control.leader"
    for payload in (b"\x00\xff", b"{}", b'{"kvbm": 1, "kind": "Completions", "rank": 0, "results": "x"}',
                    b'{"kvbm": 9, "kind": "TierSizes"}'):  # fmt: skip
        sender.connection.publish_soon(subject, payload)
    sender.send_to_leader(Completions(0, (JobResult(1, True),)))
    assert isinstance(inbox.get(5), Completions)
    assert leader.num_malformed == 4
    assert "dropping a message" in caplog.text
    assert inbox.get(0.2) is None
    leader.close()
    sender.close()


def test_event_sink_publishes_batches_on_the_worker_subject(shared_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, nats=shared_nats)
    listener = NatsEventListener(config)
    sink = NatsEventSink(config, worker_id="w3", batch_size=100)
    events = [BlockStored("cpu", (i,), i - 1 if i else None, (i, i), 2) for i in range(250)]
    sink.publish(events[:200])
    sink.publish(events[200:] + [BlockRemoved("cpu", (0,)), AllBlocksCleared("disk")])
    received = []
    assert wait_until(lambda: received.extend(listener.poll()) or sum(len(b.events) for b in received) >= 252)
    assert {b.worker_id for b in received} == {"w3"} and {b.namespace for b in received} == {namespace}
    assert [e for b in sorted(received, key=lambda b: b.seq) for e in b.events] == [
        *events, BlockRemoved("cpu", (0,)), AllBlocksCleared("disk")
    ]
    assert max(len(b.events) for b in received) <= 100
    sink.close()
    stats = sink.stats()
    assert (stats.num_published, stats.num_sent, stats.num_dropped) == (252, 252, 0)
    listener.close()


def test_listener_ignores_foreign_payloads(shared_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, nats=shared_nats)
    listener = NatsEventListener(config)
    control = NatsControlChannel(config)  # any connection can publish raw bytes
    control.connection.publish_soon(f"kvbm.{namespace}.events.w0", b"hello")
    control.connection.publish_soon(f"kvbm.{namespace}.events.w0", b'{"kvbm": 1, "namespace": "x", '
                                    b'"worker_id": "w0", "seq": 0, "events": [{"type": "Nope"}]}')  # fmt: skip
    sink = NatsEventSink(config, worker_id="w0")
    sink.publish([BlockRemoved("gpu", (9,))])
    batch = listener.get(5)
    assert batch is not None and batch.events == (BlockRemoved("gpu", (9,)),)
    assert listener.num_malformed == 2
    for closable in (sink, control, listener):
        closable.close()


def test_server_not_running_is_a_clear_error_fast(namespace, config_factory, dead_port) -> None:
    config = config_factory(namespace, nats_url=f"nats://127.0.0.1:{dead_port}")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match=rf"NATS is not reachable at nats://127.0.0.1:{dead_port}"):
        NatsEventSink(config, worker_id="w0")
    with pytest.raises(ServiceUnavailableError, match="KVBM_NATS_URL"):
        NatsControlChannel(config)
    assert time.monotonic() - started < 15
    assert _kvbm_threads() == []


def test_event_sink_falls_back_in_process_when_asked(namespace, config_factory, dead_port) -> None:
    config = config_factory(namespace, nats_url=f"nats://127.0.0.1:{dead_port}", discovery_fallback_inproc=True)
    services = make_inproc_services(config)
    sink = services.make_event_sink("w0")
    assert isinstance(sink, InProcEventSink)
    assert services.fallbacks and f"nats://127.0.0.1:{dead_port}" in services.fallbacks[0]
    services.close()


def test_outage_buffers_boundedly_and_delivers_after_restart(own_nats, namespace, config_factory) -> None:
    """While nats-server is down, publish() keeps returning, keeps ``capacity`` events and
    counts the rest as dropped; after the restart the buffered ones are delivered in order.

    To make delivery checkable, the test holds the sink's buffer lock until the listener has
    re-subscribed (otherwise the sink may flush before anyone listens again)."""
    config = config_factory(namespace, nats=own_nats)
    threads_before = _kvbm_threads()
    listener = NatsEventListener(config)
    sink = NatsEventSink(config, worker_id="w0", capacity=100)
    sink.publish([BlockRemoved("cpu", (0,))])
    assert listener.get(5) is not None
    own_nats.stop()
    assert wait_until(lambda: not sink.is_connected and listener.connection.num_disconnects >= 1)
    for i in range(1, 151):
        sink.publish([BlockRemoved("cpu", (i,))])
    stats = sink.stats()
    assert (stats.num_buffered, stats.num_dropped) == (100, 50)
    time.sleep(2.0)  # longer than the few tries allowed at start: reconnects must not give up
    with sink._lock:  # see docstring
        own_nats.start()
        assert wait_until(lambda: listener.connection.num_reconnects >= 1)
        time.sleep(0.2)  # the listener's SUB reaches the server right after its reconnect
    received = []
    assert wait_until(lambda: received.extend(listener.poll()) or sum(len(b.events) for b in received) >= 100)
    hashes = [e.block_hashes[0] for b in received for e in b.events]
    assert hashes == list(range(1, 101))
    sink.close()
    stats = sink.stats()
    assert (stats.num_published, stats.num_sent, stats.num_dropped) == (101, 101, 50)
    assert sink.connection.num_reconnects >= 1
    listener.close()
    assert _kvbm_threads() == threads_before


def test_unicast_waits_for_a_receiver_that_subscribes_late(shared_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, nats=shared_nats)
    worker, leader = NatsControlChannel(config), NatsControlChannel(config)
    worker.send_to_leader(WorkerError(0, "early"))  # nobody listens yet
    time.sleep(0.3)
    inbox = leader.leader_inbox()
    assert inbox.get(5) == WorkerError(0, "early")
    assert worker.num_retries >= 1 and worker.num_undelivered == 0
    worker.close()
    leader.close()


def test_unicast_survives_a_server_restart_in_order_without_repeats(own_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, nats=own_nats)
    worker, leader = NatsControlChannel(config), NatsControlChannel(config)
    inbox = leader.leader_inbox()
    worker.send_to_leader(WorkerError(0, "before"))
    assert inbox.get(5) == WorkerError(0, "before")
    own_nats.stop()
    assert wait_until(lambda: not worker.connection.is_connected)
    for i in range(5):
        worker.send_to_leader(Completions(0, (JobResult(i, True),)))  # returns at once
    own_nats.start()
    got = [inbox.get(10) for _ in range(5)]
    assert [m.results[0].job_id for m in got] == [0, 1, 2, 3, 4]
    worker.close()
    assert inbox.get(0.3) is None
    assert worker.num_undelivered == 0
    leader.close()


def test_a_repeated_message_is_delivered_once(shared_nats, namespace, config_factory) -> None:
    from kvbm_discovery import encode
    from kvbm_discovery.envelope import seal

    config = config_factory(namespace, nats=shared_nats)
    leader, other = NatsControlChannel(config), NatsControlChannel(config)
    inbox = leader.leader_inbox()
    subject = f"kvbm.{namespace}.control.leader"
    sealed = seal(other.secret, "retrying-worker", 1, subject, encode(WorkerError(3, "once")))
    for _ in range(2):  # as after a lost acknowledgement
        reply = other.connection.call(lambda: other.connection.nc.request(subject, sealed, timeout=2))
        assert reply.data == b"ok"
    assert inbox.get(2) == WorkerError(3, "once")
    assert inbox.get(0.2) is None and leader.num_duplicates == 1
    leader.close()
    other.close()


def test_undeliverable_unicast_is_counted_not_blocking(shared_nats, namespace, config_factory) -> None:
    config = config_factory(namespace, nats=shared_nats)
    channel = NatsControlChannel(config, delivery_timeout_secs=0.5)
    channel.send_to_worker(9, TierSizes({"cpu": 1}))  # no rank 9 anywhere
    assert wait_until(lambda: channel.num_undelivered == 1, timeout=5)
    channel.close()
