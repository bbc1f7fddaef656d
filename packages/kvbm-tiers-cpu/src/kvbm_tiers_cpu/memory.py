"""How much host memory the cpu tier may take, checked before it maps any.

Operations (any process):
- ``available_memory_bytes()``: the kernel's estimate of memory available to a new
  allocation without swapping (``MemAvailable`` of ``/proc/meminfo``), else physical pages
  free (``os.sysconf``), else ``None`` when neither can be read.
- ``check_host_memory(num_bytes, rank)``: ``ConfigError`` naming ``KVBM_CPU_CACHE_GB``, the
  bytes wanted and the bytes available when ``num_bytes`` does not fit. Without a reading it
  lets the allocation itself decide.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvbm_core.errors import ConfigError

__all__ = ["available_memory_bytes", "check_host_memory", "too_big_error"]

_MEMINFO = Path("/proc/meminfo")


def available_memory_bytes() -> int | None:
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def too_big_error(num_bytes: int, rank: int, available: int | None) -> ConfigError:
    have = "an unknown amount" if available is None else f"{available / 1e9:.2f} GB"
    return ConfigError(
        f"KVBM_CPU_CACHE_GB: the cpu tier needs {num_bytes / 1e9:.2f} GB of host memory on "
        f"rank {rank} but {have} is available; lower KVBM_CPU_CACHE_GB (or "
        "KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS), leaving room for the engine and the OS"
    )


def check_host_memory(num_bytes: int, rank: int = 0) -> None:
    available = available_memory_bytes()
    if available is not None and num_bytes > available:
        raise too_big_error(num_bytes, rank, available)
