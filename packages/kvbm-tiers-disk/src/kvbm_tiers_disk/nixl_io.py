"""File I/O through NIXL's POSIX backend (optional: needs the ``nixl`` Python package).

Runs in each worker process, called by the NIXL host <-> disk handlers (one thread at a time
per ``NixlFileIo``). Operations:
- ``load_nixl()``: NIXL's Python API module, or ``None`` when no NIXL wheel is importable
  (``nixl``, ``nixl-cu13`` or ``nixl-cu12``). NIXL logs every agent and backend it creates
  at INFO level to stdout, into the engine's log and ``kvbm bench``'s output; unless the user
  set ``NIXL_LOG_LEVEL``, kvbm sets it to ``WARN`` before the first import.
- ``nixl_module_name()``: which of those wheels ``load_nixl`` imports, or ``None``.
- ``NixlFileIo(name, fd, file_bytes, staging)``: an agent with only the POSIX backend (no
  network backend, so it works on a machine without a GPU or NIC), the file registered as
  ``FILE`` memory and the staging buffer as ``DRAM``, each once for the agent's life.
  ``ConfigError`` when NIXL is missing or its POSIX backend cannot start.
- ``post(is_write, pieces)``: one NIXL transfer request for many ``(buffer address, file
  offset, bytes)`` pieces; returns its handle at once (``NixlIoError`` when NIXL refuses it).
- ``state(handle)``: ``"DONE"``, ``"PROC"`` or ``"ERR"`` without blocking; ``release(handle)``.
- ``close()``: deregister the memory (transfers must have finished or been released).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import numpy as np

from kvbm_core.config import ConfigError

__all__ = [
    "NixlFileIo",
    "NixlIoError",
    "load_nixl",
    "nixl_module_name",
    "NIXL_MODULES",
    "INSTALL_HINT",
]

# The meta package ``nixl`` picks a CUDA variant; the variant wheels import under their own names.
NIXL_MODULES = ("nixl", "nixl_cu13", "nixl_cu12")
INSTALL_HINT = (
    "install it with `pip install 'kvbm-tiers-disk[nixl]'` (the nixl-cu13 wheel; its POSIX "
    "backend needs no GPU) or set disk_backend=threads / KVBM_DISK_BACKEND=threads"
)
_BACKEND = "POSIX"


class NixlIoError(Exception):
    """NIXL refused or failed a transfer."""


def load_nixl() -> ModuleType | None:
    name = nixl_module_name()
    return None if name is None else importlib.import_module(f"{name}._api")


def nixl_module_name() -> str | None:
    # NIXL reads its level when its logging is first configured, at import.
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    for name in NIXL_MODULES:
        try:
            importlib.import_module(f"{name}._api")
        except ImportError:
            continue
        return name
    return None


class NixlFileIo:
    def __init__(self, name: str, fd: int, file_bytes: int, staging: np.ndarray) -> None:
        api = load_nixl()
        if api is None:
            raise ConfigError(
                f"the disk tier's NIXL backend needs the nixl Python package; {INSTALL_HINT}"
            )
        self.name = name
        self.fd = fd
        try:
            # No default backends: UCX wants a network, and only POSIX is used here.
            config = api.nixl_agent_config(enable_prog_thread=False, backends=[])
            self._agent = api.nixl_agent(name, config)
            self._agent.create_backend(_BACKEND)
            self._dram = self._agent.register_memory(
                [(staging.ctypes.data, staging.nbytes, 0, "")], "DRAM", backends=[_BACKEND]
            )
            self._file = self._agent.register_memory(
                [(0, file_bytes, fd, "")], "FILE", backends=[_BACKEND]
            )
        except Exception as exc:
            raise ConfigError(
                f"NIXL's {_BACKEND} backend could not start for the disk tier "
                f"({type(exc).__name__}: {exc}); set disk_backend=threads / "
                "KVBM_DISK_BACKEND=threads"
            ) from None

    def post(self, is_write: bool, pieces: list[tuple[int, int, int]]) -> Any:
        """Start one transfer of ``(address, offset, num_bytes)`` pieces; its handle."""
        rows = np.array(pieces, dtype=np.uint64)
        dram = rows[:, [0, 2, 0]].copy()
        dram[:, 2] = 0
        file = rows[:, [1, 2, 0]].copy()
        file[:, 2] = self.fd
        handle = None
        try:
            handle = self._agent.initialize_xfer(
                "WRITE" if is_write else "READ",
                self._agent.get_xfer_descs(dram, "DRAM"),
                self._agent.get_xfer_descs(file, "FILE"),
                self.name,
                backends=[_BACKEND],
            )
            status = self._agent.transfer(handle)
        except Exception as exc:  # nixl's binding errors (nixlBackendError, ...) and bad descs
            if handle is not None:
                self.release(handle)
            raise NixlIoError(f"NIXL {type(exc).__name__}: {exc}") from None
        if status == "ERR":
            self.release(handle)
            raise NixlIoError("NIXL refused the transfer")
        return handle

    def state(self, handle: Any) -> tuple[str, str | None]:
        """``("DONE" | "PROC" | "ERR", error message or None)``; never raises."""
        try:
            status = self._agent.check_xfer_state(handle)
        except Exception as exc:
            return "ERR", f"NIXL {type(exc).__name__}: {exc}"
        if status == "ERR":
            return "ERR", "NIXL reported the transfer failed"
        return status, None

    def release(self, handle: Any) -> bool:
        """Free a finished transfer's handle (NIXL cancels one still running); False when it
        could not (then it stays owned by the agent, which frees it at exit)."""
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:
            return False
        return True

    def close(self) -> None:
        for registered in (self._file, self._dram):
            try:
                self._agent.deregister_memory(registered, backends=[_BACKEND])
            except Exception:  # best effort: the agent is going away with the handler
                continue
