"""The servers' own protection, against real servers: TLS to etcd and NATS with a throw-away
CA (made with the openssl command; skipped without it; without the CA from config the
servers' certificates are refused), etcd client certificates, and NATS user/password."""

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


def test_etcd_with_client_certificates(mtls_etcd, tls_files, namespace, config_factory) -> None:
    """etcd's --client-cert-auth: the client pair from config gets in; without it, refused."""
    endpoint = f"https://{mtls_etcd.endpoint}"
    trusted = {"etcd_endpoints": endpoint, "etcd_ca_cert": str(tls_files.ca)}
    config = config_factory(namespace, **trusted, etcd_cert_key=str(tls_files.client_key),
                            etcd_cert_cert=str(tls_files.client_cert))  # fmt: skip
    with EtcdDiscovery(config, lease_ttl_secs=2) as discovery:
        discovery.register(InstanceInfo("leader"))
        assert discovery.wait_for_peers(0, timeout=5)[0].instance_id == "leader"
    with pytest.raises(ServiceUnavailableError, match="etcd is not reachable"):
        EtcdDiscovery(config_factory(namespace, **trusted), lease_ttl_secs=2)


def test_nats_with_user_and_password(auth_nats, namespace, config_factory) -> None:
    from .conftest import NATS_PASSWORD, NATS_USER

    config = config_factory(namespace, nats=auth_nats, nats_user=NATS_USER, nats_password=NATS_PASSWORD)
    leader, worker = NatsControlChannel(config), NatsControlChannel(config)
    inbox = leader.leader_inbox()
    worker.send_to_leader(WorkerError(0, "logged in"))
    assert inbox.get(5) == WorkerError(0, "logged in")
    worker.close()
    leader.close()
    for login in ({}, {"nats_user": NATS_USER, "nats_password": "wrong"}):
        with pytest.raises(ServiceUnavailableError, match="NATS is not reachable"):
            NatsControlChannel(config_factory(namespace, nats=auth_nats, **login))
    assert "nats_password" not in repr(config) and NATS_PASSWORD not in repr(config)
