"""TLS to etcd and NATS with a throw-away CA (made with the openssl command; skipped without
it): the CA from config is used, and without it the servers' certificates are refused."""

from __future__ import annotations

import pytest

from kvbm_core.events import BlockRemoved
from kvbm_discovery import InstanceInfo, ServiceUnavailableError, WorkerError
from kvbm_discovery.etcd import EtcdDiscovery
from kvbm_discovery.nats_control import NatsControlChannel
from kvbm_discovery.nats_events import NatsEventListener, NatsEventSink

pytestmark = pytest.mark.services


def test_etcd_over_tls(tls_etcd, tls_files, namespace, config_factory) -> None:
    endpoint = f"https://{tls_etcd.endpoint}"
    config = config_factory(namespace, etcd_endpoints=endpoint, etcd_ca_cert=str(tls_files.ca))
    with EtcdDiscovery(config, lease_ttl_secs=2) as discovery:
        discovery.register(InstanceInfo("leader"))
        assert discovery.wait_for_peers(0, timeout=5)[0].instance_id == "leader"
    untrusted = config_factory(namespace, etcd_endpoints=endpoint)  # system CAs only
    with pytest.raises(ServiceUnavailableError, match="etcd is not reachable"):
        EtcdDiscovery(untrusted, lease_ttl_secs=2)


def test_nats_over_tls(tls_nats, tls_files, namespace, config_factory) -> None:
    config = config_factory(namespace, nats_url=tls_nats.url, nats_tls_ca=str(tls_files.ca))
    leader, worker = NatsControlChannel(config), NatsControlChannel(config)
    inbox = leader.leader_inbox()
    worker.send_to_leader(WorkerError(0, "over tls"))
    assert inbox.get(5) == WorkerError(0, "over tls")
    listener, sink = NatsEventListener(config), NatsEventSink(config, "w0")
    sink.publish([BlockRemoved("cpu", (1,))])
    assert listener.get(5).events == (BlockRemoved("cpu", (1,)),)
    for closable in (sink, listener, worker, leader):
        closable.close()
    with pytest.raises(ServiceUnavailableError, match="NATS is not reachable"):
        NatsControlChannel(config_factory(namespace, nats_url=tls_nats.url))
