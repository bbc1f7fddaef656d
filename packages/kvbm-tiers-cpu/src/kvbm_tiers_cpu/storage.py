"""G2 storage: one rank's pinned host buffer, carved into block slots.

Runs in each worker process. Operations:
- ``PinnedHostStorage(layout, num_slots, ...)``: checks the bytes fit in the available host
  memory (``ConfigError`` naming ``KVBM_CPU_CACHE_GB`` and both amounts otherwise), maps ``num_slots * layout.bytes_per_block``
  bytes at once and, where a GPU is used, starts pinning them in the background (page-locking
  tens of GB takes about 0.6 s per GiB, so it must not hold up start-up). Returns at once.
- ``host_view()``: the ``[num_slots, bytes_per_block]`` uint8 numpy view; usable at once (the
  disk tier reads and writes through it; pinning only matters to DMA).
- ``rows``: the same bytes as a ``torch`` uint8 tensor (what the GPU handlers copy to and from).
- ``is_ready`` / ``failure``: pinned and usable for DMA / why it will never be (allocation
  error, or still not pinned when the init timeout passed).
- ``wait_ready(timeout=None)``: block until pinned; raises :class:`HostMemoryError` saying what
  it waited for, how far it got and what to change. ``None`` waits until the init deadline
  (``KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS`` after construction).
- ``pin_ranges``: ``(first_slot, end_slot)`` of each separately pinned range; one DMA copy must
  stay inside one range.
- ``close()``: stop pinning, unpin, unmap; idempotent.

Without CUDA (``pin=False``) the same buffer is plain memory and is ready at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch

from kvbm_core.layout import KvLayout
from kvbm_core.transfer import CPU, Storage
from kvbm_tiers_cpu.memory import available_memory_bytes, check_host_memory, too_big_error

__all__ = ["HostMemoryError", "PinnedHostStorage"]

logger = logging.getLogger("kvbm.tiers.cpu")

GIB = 1 << 30
HUGE_PAGE = 2 << 20
# Portable: usable from every CUDA context; mapped: reachable by kernels (zero-copy).
_HOST_REGISTER_FLAGS = 0x01 | 0x02


class HostMemoryError(RuntimeError):
    """The CPU tier's host memory could not be made ready (see the message for the fix)."""


class PinnedHostStorage(Storage):
    medium = CPU

    def __init__(
        self,
        layout: KvLayout,
        num_slots: int,
        *,
        pin: bool | None = None,
        rank: int = 0,
        init_timeout_s: float = 1800.0,
        pin_threads: int = 8,
        pin_chunk_bytes: int = GIB,
        huge_pages: bool = True,
        background: bool = True,
    ) -> None:
        if num_slots <= 0:
            raise ValueError(
                f"the cpu tier needs at least one slot, got {num_slots}; set KVBM_CPU_CACHE_GB "
                f"or KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS to a size of at least one block "
                f"({layout.bytes_per_block} bytes)"
            )
        self.layout = layout
        self.num_slots = num_slots
        self.rank = rank
        self.num_bytes = num_slots * layout.bytes_per_block
        self.is_pinned_memory = torch.cuda.is_available() if pin is None else pin
        self.init_timeout_s = init_timeout_s
        self._started_at = time.monotonic()
        check_host_memory(self.num_bytes, rank)  # a clear error, not ENOMEM or the OOM killer
        try:
            self._mm = mmap.mmap(-1, self.num_bytes)  # page-aligned, zero pages on first touch
        except OSError:
            raise too_big_error(self.num_bytes, rank, available_memory_bytes()) from None
        if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
            self._mm.madvise(mmap.MADV_HUGEPAGE)  # fewer pages to fault in and pin
        self._array: np.ndarray | None = np.frombuffer(self._mm, dtype=np.uint8).reshape(
            num_slots, layout.bytes_per_block
        )
        self.rows: torch.Tensor = torch.from_numpy(self._array)
        page_bytes = HUGE_PAGE if huge_pages else mmap.PAGESIZE
        self.pin_ranges = _split_slots(num_slots, layout.bytes_per_block, pin_chunk_bytes, page_bytes)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: str | None = None
        self._is_closing = False
        self._is_stopping = False
        self._pinned_ptrs: list[int] = []
        self._pinned_bytes = 0
        self._thread: threading.Thread | None = None
        if not self.is_pinned_memory:
            self._ready.set()
        elif background:
            self._thread = threading.Thread(
                target=self._pin_all, args=(pin_threads,), name=f"kvbm-cpu-pin-{rank}", daemon=True
            )
            self._thread.start()
        else:
            self._pin_all(pin_threads)

    # -- state ------------------------------------------------------------------------------

    def host_view(self) -> np.ndarray | None:
        return self._array

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self._error is None

    @property
    def pinned_bytes(self) -> int:
        return self._pinned_bytes

    @property
    def failure(self) -> str | None:
        """Why the storage will never become ready, or ``None`` while it still may (or is)."""
        if self._error is not None:
            return self._error
        if not self._ready.is_set() and time.monotonic() - self._started_at > self.init_timeout_s:
            return self._timeout_message(time.monotonic() - self._started_at)
        return None

    def wait_ready(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.init_timeout_s - (time.monotonic() - self._started_at)
        if not self._ready.wait(max(0.0, timeout)):
            raise HostMemoryError(self._timeout_message(time.monotonic() - self._started_at))
        if self._error is not None:
            raise HostMemoryError(self._error)

    def _timeout_message(self, waited_s: float) -> str:
        return (
            f"cpu tier (rank {self.rank}): pinned host memory was still not ready after "
            f"{waited_s:.1f} s: {self._pinned_bytes / GIB:.1f} of {self.num_bytes / GIB:.1f} GiB "
            f"pinned (pinning takes about 0.6 s per GiB). Raise "
            f"KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS (now {self.init_timeout_s:g} s) or lower "
            f"KVBM_CPU_CACHE_GB"
        )

    # -- pinning ----------------------------------------------------------------------------

    def _pin_all(self, num_threads: int) -> None:
        base = self.rows.data_ptr()
        bpb = self.layout.bytes_per_block
        ranges = [(base + start * bpb, (end - start) * bpb) for start, end in self.pin_ranges]
        logger.info(
            "cpu tier (rank %d): pinning %.1f GiB of host memory in %d range(s), %d thread(s)",
            self.rank, self.num_bytes / GIB, len(ranges), num_threads,
        )
        errors: list[Exception] = []
        with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="kvbm-pin") as pool:
            futures = [pool.submit(self._pin_one, ptr, size) for ptr, size in ranges]
            for future in as_completed(futures):
                try:
                    self._note_pinned(*future.result())
                except Exception as exc:  # noqa: BLE001 - reported through wait_ready / failure
                    errors.append(exc)
                    self._is_stopping = True
        try:
            if errors and not self._is_closing:
                first_error = errors[0]
                self._error = (
                    f"cpu tier (rank {self.rank}): could not pin {self.num_bytes / GIB:.1f} GiB of "
                    f"host memory ({type(first_error).__name__}: {first_error}); lower KVBM_CPU_CACHE_GB or raise "
                    f"the memlock limit (ulimit -l) of the worker"
                )
                logger.error("%s", self._error)
            elif not errors:
                logger.info(
                    "cpu tier (rank %d): %.1f GiB pinned in %.1f s",
                    self.rank, self.num_bytes / GIB, time.monotonic() - self._started_at,
                )
        finally:
            self._ready.set()

    def _pin_one(self, ptr: int, size: int) -> tuple[int, int]:
        if self._is_stopping:
            raise HostMemoryError("pinning stopped")
        self._pin_range(ptr, size)
        return ptr, size

    def _note_pinned(self, ptr: int, size: int) -> None:
        with self._lock:
            before = self._pinned_bytes * 4 // self.num_bytes
            self._pinned_ptrs.append(ptr)
            self._pinned_bytes += size
            quarter = self._pinned_bytes * 4 // self.num_bytes
        if quarter != before and self._pinned_bytes < self.num_bytes:
            logger.info(
                "cpu tier (rank %d): %.1f / %.1f GiB pinned (%.1f s)",
                self.rank, self._pinned_bytes / GIB, self.num_bytes / GIB,
                time.monotonic() - self._started_at,
            )

    def _pin_range(self, ptr: int, size: int) -> None:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(ptr, size, _HOST_REGISTER_FLAGS)
        if int(err) != 0:
            raise HostMemoryError(f"cudaHostRegister({size} bytes) failed: {cudart.cudaGetErrorString(err)}")

    def _unpin_range(self, ptr: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(ptr)

    # -- teardown ---------------------------------------------------------------------------

    def __del__(self) -> None:
        # A registration outliving its mapping would make the next mapping at that address
        # fail to pin ("already mapped"): unpin even when nobody called close().
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        if getattr(self, "_array", None) is None:
            return
        self._is_closing = True
        self._is_stopping = True
        if self._thread is not None:
            self._thread.join()
        for ptr in self._pinned_ptrs:
            self._unpin_range(ptr)
        self._pinned_ptrs.clear()
        self._error = self._error or f"cpu tier (rank {self.rank}): storage is closed"
        self._array = None
        del self.rows
        # Someone may still hold host_view(); then the mapping goes when they drop it.
        with contextlib.suppress(BufferError):
            self._mm.close()


def _split_slots(
    num_slots: int, bytes_per_block: int, chunk_bytes: int, page_bytes: int
) -> list[tuple[int, int]]:
    """Slot ranges of about ``chunk_bytes`` each, covering every slot.

    Each range starts on a page boundary: two registrations must never share a page.
    """
    slots_per_page = page_bytes // math.gcd(bytes_per_block, page_bytes)
    step = max(1, round(chunk_bytes / bytes_per_block / slots_per_page)) * slots_per_page
    return [(start, min(start + step, num_slots)) for start in range(0, num_slots, step)]
