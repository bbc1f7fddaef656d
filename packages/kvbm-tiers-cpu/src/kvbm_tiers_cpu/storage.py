"""G2 storage: one rank's pinned host buffer, carved into block slots.

Runs in each worker process. Operations:
- ``PinnedHostStorage(layout, num_slots, ...)``: checks the bytes fit in the available host
  memory (``ConfigError`` naming ``KVBM_CPU_CACHE_GB`` and both amounts otherwise), maps ``num_slots * layout.bytes_per_block``
  bytes at once and, where a GPU is used, starts pinning them in the background (page-locking
  tens of GB takes about 0.6 s per GiB, so it must not hold up start-up). Returns at once.
- ``host_view()``: the ``[num_slots, bytes_per_block]`` uint8 numpy view; usable at once (the
  disk tier reads and writes through it; pinning only matters to DMA).
- ``rows``: the same bytes as a ``torch`` uint8 tensor (what the GPU handlers copy to and from).
- ``is_ready`` / ``failure``: all pinned and usable for DMA / why it will never be (allocation
  error, or pinning stalled: no range finished for ``init_timeout_s``).
- ``are_slots_ready(slot_ids)``: every range holding these slots is pinned. Ranges pin in slot
  order (the leader hands out low slots first) and serve as soon as each is pinned: the tier
  is usable after one range (about 0.45 s per GiB range), not after all of it (minutes for a
  TB). ``num_ready_slots`` and ``first_ready_s`` (seconds from construction to the first
  pinned range) say how far it got.
- ``wait_ready(timeout=None)``: block until pinned; raises :class:`HostMemoryError` saying what
  it waited for, how far it got and what to change. ``None`` waits while pinning progresses.
- ``pin_ranges``: ``(first_slot, end_slot)`` of each separately pinned range; one DMA copy must
  stay inside one range. All but the last hold ``slots_per_range`` slots.

The init timeout (``KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``) bounds how long pinning may go
without progress, not its total time, so it does not cap the tier's size.
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
        self._progress_at = self._started_at
        self.first_ready_s: float | None = None
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
        self.slots_per_range = self.pin_ranges[0][1] - self.pin_ranges[0][0]
        self._is_range_pinned = np.full(len(self.pin_ranges), not self.is_pinned_memory)
        self._num_ready_slots = 0 if self.is_pinned_memory else num_slots
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: str | None = None
        self._is_closing = False
        self._is_stopping = False
        self._pinned_ptrs: list[int] = []
        self._pinned_bytes = 0
        self._thread: threading.Thread | None = None
        if not self.is_pinned_memory:
            self.first_ready_s = 0.0
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
    def num_ready_slots(self) -> int:
        return self._num_ready_slots

    def are_slots_ready(self, slot_ids: np.ndarray) -> bool:
        """Whether DMA may touch these slots now (every range holding them is pinned)."""
        if self._error is not None:
            return False
        if self._ready.is_set() or slot_ids.size == 0:
            return True
        return bool(self._is_range_pinned[np.asarray(slot_ids) // self.slots_per_range].all())

    @property
    def failure(self) -> str | None:
        """Why the storage will never become ready, or ``None`` while it still may (or is)."""
        if self._error is not None:
            return self._error
        if not self._ready.is_set() and time.monotonic() - self._progress_at > self.init_timeout_s:
            return self._timeout_message(time.monotonic() - self._started_at)
        return None

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until pinned; ``None``: for as long as pinning makes progress."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.failure is not None:
                raise HostMemoryError(self.failure)
            if deadline is not None and time.monotonic() > deadline:
                raise HostMemoryError(self._timeout_message(time.monotonic() - self._started_at))
        if self._error is not None:
            raise HostMemoryError(self._error)

    def _timeout_message(self, waited_s: float) -> str:
        stalled_s = time.monotonic() - self._progress_at
        return (
            f"cpu tier (rank {self.rank}): pinned host memory was still not ready after "
            f"{waited_s:.1f} s: {self._pinned_bytes / GIB:.1f} of {self.num_bytes / GIB:.1f} GiB "
            f"pinned, the last range {stalled_s:.1f} s ago (pinning takes about 0.45 s per GiB; "
            f"pinned ranges serve meanwhile). Pinning that stalls longer than "
            f"KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS (now {self.init_timeout_s:g} s) fails the tier; "
            f"raise it, or lower KVBM_CPU_CACHE_GB"
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
        # The first range alone, then the rest in parallel: where the driver serializes
        # registrations, eight at once would make the first usable slot wait for eight ranges.
        indexed = list(enumerate(ranges))
        for batch, threads in ((indexed[:1], 1), (indexed[1:], num_threads)):
            if batch and not errors:
                self._pin_batch(batch, threads, errors)
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

    def _pin_batch(self, batch: list[tuple[int, tuple[int, int]]], num_threads: int, errors: list[Exception]) -> None:
        with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="kvbm-pin") as pool:
            # Submitted in slot order, so the low slots the leader hands out first pin first.
            futures = [pool.submit(self._pin_one, i, ptr, size) for i, (ptr, size) in batch]
            for future in as_completed(futures):
                try:
                    self._note_pinned(*future.result())
                except Exception as exc:  # noqa: BLE001 - reported through wait_ready / failure
                    errors.append(exc)
                    self._is_stopping = True

    def _pin_one(self, index: int, ptr: int, size: int) -> tuple[int, int, int]:
        if self._is_stopping:
            raise HostMemoryError("pinning stopped")
        self._pin_range(ptr, size)
        return index, ptr, size

    def _note_pinned(self, index: int, ptr: int, size: int) -> None:
        with self._lock:
            before = self._pinned_bytes * 4 // self.num_bytes
            self._pinned_ptrs.append(ptr)
            self._pinned_bytes += size
            quarter = self._pinned_bytes * 4 // self.num_bytes
            self._progress_at = time.monotonic()
            if self.first_ready_s is None:
                self.first_ready_s = self._progress_at - self._started_at
            start, end = self.pin_ranges[index]
            self._num_ready_slots += end - start
            self._is_range_pinned[index] = True  # last: a reader seeing it sees the range pinned
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
