"""The ``discovery`` plugin of group ``kvbm``: backends ``inproc`` and ``etcd``."""

from __future__ import annotations

import kvbm_core
from kvbm_core.plugins import DiscoveryBackendSpec
from kvbm_discovery.services import make_etcd_services, make_inproc_services


@kvbm_core.hookimpl
def kvbm_discovery_backends() -> list[DiscoveryBackendSpec]:
    return [
        DiscoveryBackendSpec(
            name="inproc",
            make=make_inproc_services,
            description="one process, no servers: registry, barrier, control channel and events in memory",
        ),
        DiscoveryBackendSpec(
            name="etcd",
            make=make_etcd_services,
            description="etcd leases/watches for registration and the barrier; NATS (KVBM_NATS_URL) "
            "for the control channel and KV events",
        ),
    ]
