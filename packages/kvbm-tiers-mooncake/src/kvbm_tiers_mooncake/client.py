"""Connecting to Mooncake Store (leader and workers).

- ``StoreSettings.from_options(options)``: the tier options that say where the store is.
- ``probe(settings, timeout_s)``: ``None`` when the master and metadata server accept a TCP
  connection within ``timeout_s``, else why not. Mooncake's own ``setup`` retries for about
  90 s against a master that is down, so kvbm probes first and never calls it then.
- ``connect(settings, segment_bytes)``: a set-up ``MooncakeDistributedStore`` client;
  ``StoreUnavailable`` (naming the address and the fix) when the store cannot be reached or
  the ``mooncake`` module is not installed. ``segment_bytes`` is the memory this process
  contributes to the store (0 for a pure client such as the leader).
"""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["StoreSettings", "StoreUnavailable", "probe", "connect", "INSTALL_HINT"]

INSTALL_HINT = (
    "install the store client: pip install mooncake-transfer-engine-non-cuda (CPU), "
    "mooncake-transfer-engine (CUDA 12) or mooncake-transfer-engine-cuda13; it needs the "
    "system libraries libibverbs1 librdmacm1 libnuma1 even on the TCP transport"
)


class StoreUnavailable(ConnectionError):
    pass


@dataclass(frozen=True)
class StoreSettings:
    master: str
    metadata_server: str
    protocol: str = "tcp"
    device_name: str = ""
    local_hostname: str = "127.0.0.1"
    buffer_bytes: int = 64 << 20

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> StoreSettings:
        master = str(options["mooncake_master"])
        host = master.rsplit(":", 1)[0]
        metadata = options.get("mooncake_metadata_server") or f"http://{host}:8080/metadata"
        return cls(
            master=master,
            metadata_server=str(metadata),
            protocol=str(options.get("mooncake_protocol", "tcp")),
            device_name=str(options.get("mooncake_device_name") or ""),
            local_hostname=str(options.get("mooncake_local_hostname") or socket.gethostname()),
            buffer_bytes=int(options.get("mooncake_buffer_mib", 64)) << 20,
        )


def _endpoints(settings: StoreSettings) -> list[tuple[str, str, int]]:
    host, _, port = settings.master.rpartition(":")
    found = [("master", host, int(port))]
    url = urllib.parse.urlparse(settings.metadata_server)
    if url.scheme in ("http", "https") and url.hostname:
        found.append(("metadata server", url.hostname, url.port or 80))
    return found


def probe(settings: StoreSettings, timeout_s: float = 1.0) -> str | None:
    try:
        endpoints = _endpoints(settings)
    except ValueError:
        return f"mooncake_master={settings.master!r} is not host:port"
    for what, host, port in endpoints:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            return f"Mooncake {what} at {host}:{port} is unreachable ({exc})"
    return None


def connect(settings: StoreSettings, segment_bytes: int, timeout_s: float = 1.0) -> Any:
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise StoreUnavailable(
            f"the mooncake module is not importable ({exc}); {INSTALL_HINT}"
        ) from exc
    why = probe(settings, timeout_s)
    if why is not None:
        raise StoreUnavailable(
            f"{why}; start mooncake_master (see the kvbm-tiers-mooncake README) or fix "
            "mooncake_master / mooncake_metadata_server"
        )
    store = MooncakeDistributedStore()
    rc = store.setup(
        settings.local_hostname,
        settings.metadata_server,
        segment_bytes,
        settings.buffer_bytes,
        settings.protocol,
        settings.device_name,
        settings.master,
    )
    if rc != 0:
        raise StoreUnavailable(
            f"Mooncake client setup against master {settings.master} failed (code {rc}); check "
            "mooncake_protocol / mooncake_device_name and the master's log"
        )
    return store
