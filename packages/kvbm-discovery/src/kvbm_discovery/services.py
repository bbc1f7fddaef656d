"""What a discovery backend hands a kvbm process: discovery, control channel, event sinks.

``DiscoveryBackendSpec.make(config)`` (see :mod:`kvbm_discovery.plugin`) returns a
:class:`DiscoveryServices`; every process builds one at start and closes it at exit.

- ``inproc``: in-process discovery and control channel; event sink over NATS when
  ``KVBM_NATS_URL`` is set, else in-process.
- ``etcd``: etcd discovery; control channel over NATS when ``KVBM_NATS_URL`` is set (ranks in
  other processes need it), else in-process with a warning; event sink as above. Both
  sign with the deployment secret (``KVBM_CONTROL_SECRET`` / ``_FILE``; a ``ConfigError``
  naming them when missing, unless ``KVBM_CONTROL_INSECURE=1``) under one sender id, and
  the control channel checks every sender against the etcd registrations.

A server that does not answer at start raises :class:`ServiceUnavailableError` naming it,
unless ``KVBM_DISCOVERY_FALLBACK_INPROC`` is set: then that part runs in-process, a warning
says so, and ``fallbacks`` records why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.events import EventSink
from kvbm_discovery.control import ControlChannel
from kvbm_discovery.discovery import Discovery
from kvbm_discovery.envelope import new_sender_id
from kvbm_discovery.errors import ServiceUnavailableError
from kvbm_discovery.event_sink import DEFAULT_CAPACITY
from kvbm_discovery.inproc import InProcControlChannel, InProcDiscovery, InProcEventSink
from kvbm_discovery.naming import check_token

__all__ = ["DiscoveryServices", "make_inproc_services", "make_etcd_services", "lease_ttl_from_env"]

log = logging.getLogger(__name__)

T = TypeVar("T")
LEASE_TTL_VAR = "KVBM_ETCD_LEASE_TTL_SECS"


def lease_ttl_from_env(environ: dict[str, str] | None = None, default: int = 10) -> int:
    text = (os.environ if environ is None else environ).get(LEASE_TTL_VAR, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 2:
        raise ConfigError(f"{LEASE_TTL_VAR}={text!r} is invalid: expected whole seconds >= 2, e.g. 10")
    return int(text)


@dataclass
class DiscoveryServices:
    backend: str
    config: KvbmConfig
    discovery: Discovery
    control: ControlChannel
    fallbacks: list[str] = field(default_factory=list)
    _sinks: list[EventSink] = field(default_factory=list)

    def make_event_sink(self, worker_id: str = "0", capacity: int = DEFAULT_CAPACITY) -> EventSink:
        """A sink publishing on ``kvbm.<ns>.events.<worker_id>`` (NATS) or kept in-process."""
        sink: EventSink
        if self.config.nats_url:
            from kvbm_discovery.nats_events import NatsEventSink

            sink = _or_fallback(
                self,
                lambda: NatsEventSink(self.config, worker_id, capacity),
                lambda: InProcEventSink(worker_id, capacity),
                "event sink",
            )
        else:
            sink = InProcEventSink(worker_id, capacity)
        self._sinks.append(sink)
        return sink

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks.clear()
        self.control.close()
        self.discovery.close()


def _or_fallback(services: DiscoveryServices, make: Callable[[], T], fallback: Callable[[], T], what: str) -> T:
    try:
        return make()
    except ServiceUnavailableError as exc:
        if not services.config.discovery_fallback_inproc:
            raise
        log.warning("kvbm: %s runs in-process (KVBM_DISCOVERY_FALLBACK_INPROC): %s", what, exc)
        services.fallbacks.append(f"{what}: {exc}")
        return fallback()


def make_inproc_services(config: KvbmConfig) -> DiscoveryServices:
    namespace = check_token(config.namespace)
    return DiscoveryServices(
        backend="inproc",
        config=config,
        discovery=InProcDiscovery(namespace, config.leader_worker_init_timeout_secs),
        control=InProcControlChannel(namespace),
    )


def make_etcd_services(config: KvbmConfig, lease_ttl_secs: int | None = None) -> DiscoveryServices:
    from kvbm_discovery.etcd import EtcdDiscovery

    namespace = check_token(config.namespace)
    ttl = lease_ttl_from_env() if lease_ttl_secs is None else lease_ttl_secs
    fallbacks: list[str] = []
    sender_id = new_sender_id()  # one identity for this process's registrations and messages

    def inproc_discovery() -> Discovery:
        return InProcDiscovery(namespace, config.leader_worker_init_timeout_secs)

    def etcd_discovery() -> Discovery:
        return EtcdDiscovery(config, lease_ttl_secs=ttl, sender_id=sender_id)

    try:
        discovery = etcd_discovery()
    except ServiceUnavailableError as exc:
        if not config.discovery_fallback_inproc:
            raise
        log.warning("kvbm: discovery runs in-process (KVBM_DISCOVERY_FALLBACK_INPROC): %s", exc)
        fallbacks.append(f"discovery: {exc}")
        discovery = inproc_discovery()
    control: ControlChannel
    if config.nats_url:
        from kvbm_discovery.nats_control import NatsControlChannel

        # Senders are checked against etcd only: an in-process fallback sees no other process.
        roster = discovery if isinstance(discovery, EtcdDiscovery) else None
        try:
            control = NatsControlChannel(config, sender_id=sender_id, roster=roster)
        except ConfigError:
            discovery.close()
            raise
        except ServiceUnavailableError as exc:
            if not config.discovery_fallback_inproc:
                discovery.close()
                raise
            log.warning("kvbm: control channel runs in-process (KVBM_DISCOVERY_FALLBACK_INPROC): %s", exc)
            fallbacks.append(f"control channel: {exc}")
            control = InProcControlChannel(namespace)
    else:
        log.warning(
            "kvbm: KVBM_NATS_URL is not set, so the control channel is in-process: ranks in other "
            "processes cannot report completions; set KVBM_NATS_URL for TP>1 across processes"
        )
        control = InProcControlChannel(namespace)
    return DiscoveryServices("etcd", config, discovery, control, fallbacks)
