"""Connecting to etcd: endpoints, TLS (a CA and optionally a client certificate) and the one
grpc loop of the process (used by :mod:`kvbm_discovery.etcd`, any process).

- ``parse_endpoints(config)``: ``KVBM_ETCD_ENDPOINTS`` as :class:`EtcdEndpoint`s, or a
  ``ConfigError`` naming the bad entry.
- ``tls_credentials(config)``: grpc credentials from ``KVBM_ETCD_CA_CERT`` and the client pair
  ``KVBM_ETCD_CERT_KEY``/``_CERT_CERT`` (for etcd's ``--client-cert-auth``).
- ``TlsClient``: ``aetcd.Client`` over a TLS channel; ``grpc_loop()``: the shared loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_discovery._loop import BackgroundLoop

__all__ = ["CHANNEL_OPTIONS", "EtcdEndpoint", "TlsClient", "grpc_loop", "parse_endpoints", "tls_credentials"]

CHANNEL_OPTIONS = {
    # gRPC's default reconnect backoff grows to minutes; a restarted etcd must be found fast.
    # (The minimum is also gRPC's connect timeout: too small fails handshakes under load.)
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 1000,
    "grpc.max_reconnect_backoff_ms": 1000,
}

@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int
    is_tls: bool

    def __str__(self) -> str:
        return f"{'https' if self.is_tls else 'http'}://{self.host}:{self.port}"


def parse_endpoints(config: KvbmConfig) -> list[EtcdEndpoint]:
    endpoints = []
    for text in config.etcd_endpoints:
        scheme, _, rest = text.rpartition("://")
        host, _, port = rest.rstrip("/").rpartition(":")
        if scheme not in ("", "http", "https") or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"KVBM_ETCD_ENDPOINTS entry {text!r} is invalid: expected host:port, "
                "http://host:port or https://host:port (comma-separated)"
            )
        endpoints.append(EtcdEndpoint(host, int(port), scheme == "https" or bool(config.etcd_ca_cert)))
    if not endpoints:
        raise ConfigError("KVBM_ETCD_ENDPOINTS is empty: set it to e.g. 127.0.0.1:2379")
    return endpoints


def _read(path: str | None, var: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}={path!r} cannot be read ({exc.strerror}); point it at a PEM file") from None


def tls_credentials(config: KvbmConfig) -> grpc.ChannelCredentials:
    if bool(config.etcd_cert_key) != bool(config.etcd_cert_cert):
        raise ConfigError("KVBM_ETCD_CERT_KEY and KVBM_ETCD_CERT_CERT go together: set both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.etcd_ca_cert, "KVBM_ETCD_CA_CERT"),
        private_key=_read(config.etcd_cert_key, "KVBM_ETCD_CERT_KEY"),
        certificate_chain=_read(config.etcd_cert_cert, "KVBM_ETCD_CERT_CERT"),
    )


class TlsClient(aetcd.Client):
    """``aetcd.Client`` over a TLS channel (aetcd itself only opens insecure channels)."""

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = rpc.secure_channel(target, self._credentials, options=self._options.items())
        if self._username is not None and self._password is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", reply.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


_GRPC_LOOP: BackgroundLoop | None = None
_GRPC_LOOP_LOCK = threading.Lock()


def grpc_loop() -> BackgroundLoop:
    """The one loop every etcd client of the process runs on, for the process's lifetime.

    grpc-aio binds its completion queue to each loop that uses it and does not let go of a
    closed one; with a loop per client, closing one client now and then stalls another's
    calls. One long-lived daemon loop avoids that.
    """
    global _GRPC_LOOP
    with _GRPC_LOOP_LOCK:
        if _GRPC_LOOP is None or not _GRPC_LOOP.is_running:
            _GRPC_LOOP = BackgroundLoop("kvbm-etcd")
        return _GRPC_LOOP


