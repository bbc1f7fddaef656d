"""GPU <-> pinned host transfer handlers (the ``gpu -> cpu`` and ``cpu -> gpu`` pairs).

Run in each worker process, on the thread that drives its ``TransferEngine``. Operations (the
``TransferHandler`` contract of ``kvbm_core.transfer``):
- ``submit(jobs, ready)``: checks each job (media, id ranges, no destination named twice; a bad
  job fails alone), then enqueues the rest and returns: no host sync. ``ready`` is a
  ``torch.cuda.Event`` (or stream) the copies wait for on the GPU (``stream.wait_event``).
  Host memory serves range by range while it is pinned: a job whose host slots all lie in
  pinned ranges starts at once; one touching a range still being pinned waits inside the
  handler (never in the engine) and starts from ``poll()`` once that range is; if it never
  becomes ready it fails with the storage's reason.
- ``poll()``: results of finished jobs, found by ``event.query()``; a CUDA error fails the
  jobs it hit. ``JobResult.num_bytes`` is the bytes moved.
- ``close()``: waits for the copies in flight, fails jobs still waiting for memory.

How a batch moves: the blocks of all jobs of one ``submit`` go through two GPU staging buffers
in turn (``staging_bytes`` each). Offload gathers blocks from the pool into a buffer with one
kernel (``PoolAccess.gather``), then copies the buffer to the host slots with one
``cudaMemcpyAsync`` per run of consecutive slots. Onboard does the reverse: one copy per slot
run into a buffer, then one scatter kernel. Kernels and copies sit on two streams per
direction, so gathering buffer k+1 overlaps copying buffer k, and onboarding (high-priority
streams) never queues behind offloading. Within a job, blocks are taken in host-slot order so
adjacent slots coalesce into one copy. A buffer's worth of blocks whose host slots are
scattered (runs under ``ZERO_COPY_BELOW_RUN_BYTES`` on average) instead moves with one
zero-copy Triton kernel that reads or writes the registered host memory directly, where
Triton and the driver allow it (``zero_copy=None`` decides; ``False`` always stages).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvbm_core.regions import RegionPool
from kvbm_core.transfer import CPU, GPU, DevicePool, JobResult, TransferHandler, TransferJob
from kvbm_tiers_cpu import _triton
from kvbm_tiers_cpu._device import Lane, upload_ids
from kvbm_tiers_cpu._pool import PoolAccess
from kvbm_tiers_cpu._regions import RegionAccess
from kvbm_tiers_cpu.storage import PinnedHostStorage

__all__ = ["DEFAULT_STAGING_BYTES", "GpuToHostHandler", "HostToGpuHandler", "host_runs"]

# 64 MiB rather than 32: with both directions busy, 128 KiB blocks moved 1.7-1.8x one
# direction instead of 1.1-1.25x (H200, measured); one direction is the same either way.
DEFAULT_STAGING_BYTES = 64 << 20
# Copy-engine copies of 2 MiB and more reach the link rate even one per block (H100, measured);
# shorter runs lose to per-copy overhead, and a zero-copy kernel moves them at about 50 GB/s.
ZERO_COPY_BELOW_RUN_BYTES = 2 << 20


def host_runs(slot_ids: np.ndarray, slots_per_range: int) -> list[tuple[int, int, int]]:
    """``(first_slot, first_row, num_slots)`` of each run of consecutive slots.

    Row ``i`` belongs to ``slot_ids[i]``. A run never crosses a multiple of
    ``slots_per_range`` (the boundary of a separately pinned range).
    """
    if slot_ids.size == 0:
        return []
    is_break = (np.diff(slot_ids) != 1) | (slot_ids[1:] % slots_per_range == 0)
    starts = np.concatenate(([0], np.flatnonzero(is_break) + 1))
    ends = np.concatenate((starts[1:], [slot_ids.size]))
    return [(int(slot_ids[s]), int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


@dataclass(frozen=True, slots=True)
class _Checked:
    job: TransferJob
    gpu_ids: np.ndarray
    host_ids: np.ndarray


class _BlockCopyHandler(TransferHandler):
    """Shared machinery; subclasses say which lane goes first and what each step does."""

    _is_onboard: bool

    def __init__(
        self,
        pool: DevicePool | RegionPool,
        host: PinnedHostStorage,
        *,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        zero_copy: bool | None = None,
    ) -> None:
        if pool.layout.bytes_per_block != host.layout.bytes_per_block:
            raise ValueError(
                f"GPU pool blocks are {pool.layout.bytes_per_block} bytes but cpu tier slots are "
                f"{host.layout.bytes_per_block}; build the cpu tier from the pool's layout"
            )
        # A KVCacheManagerV2 engine hands page regions, not one pool tensor (kvbm_core.regions).
        self._pool: PoolAccess | RegionAccess = (
            RegionAccess(pool) if isinstance(pool, RegionPool) else PoolAccess(pool)
        )
        self._host = host
        self._bytes_per_block = host.layout.bytes_per_block
        self._slots_per_range = host.pin_ranges[0][1] - host.pin_ranges[0][0]
        self.rows_per_buffer = max(1, staging_bytes // self._bytes_per_block)
        device = self._pool.device
        shape = (self.rows_per_buffer, self._bytes_per_block)
        self._staging = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(2)]
        self._free: list[Any] = [None, None]
        self._next_buffer = 0
        # Onboarding gates a waiting request's prefill: its streams get the higher priority.
        priority = -1 if self._is_onboard else 0
        self._copy_lane = Lane(device, priority)
        self._kernel_lane = Lane(device, priority)
        self._in_flight: collections.deque[tuple[Any, list[tuple[int, int]]]] = collections.deque()
        self._done: list[JobResult] = []
        self._deferred: list[tuple[list[_Checked], Any]] = []
        self._is_closed = False
        self.is_zero_copy_enabled = self._zero_copy_allowed() if zero_copy is None else zero_copy
        if self.is_zero_copy_enabled and not self._pool.has_triton:
            raise ValueError("zero-copy transfers need CUDA, Triton and 8-byte aligned blocks")
        self._pool.warm_up(self._staging[0].data_ptr())

    def _zero_copy_allowed(self) -> bool:
        device = self._pool.device
        return (
            self._pool.has_triton
            and self._host.is_pinned_memory
            and _triton.can_address_host_memory(device.index if device.index is not None else 0)
        )

    @property
    def is_batched(self) -> bool:
        """One gather/scatter kernel per staging buffer (else one per layer)."""
        return self._pool.is_batched

    # -- TransferHandler ----------------------------------------------------------------------

    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        checked = [c for c in map(self._check, jobs) if c is not None]
        if not checked:
            return
        if self._is_closed:
            self._fail(checked, f"{self.src_medium} -> {self.dst_medium} handler is closed")
        elif (failure := self._host.failure) is not None:
            self._fail(checked, failure)
        else:
            self._launch_pinned(checked, ready)

    def _launch_pinned(self, jobs: list[_Checked], ready: Any) -> None:
        """Launch the jobs whose host slots are pinned; keep the others until theirs are."""
        now = [c for c in jobs if self._host.are_slots_ready(c.host_ids)]
        if len(now) < len(jobs):
            self._deferred.append(([c for c in jobs if not self._host.are_slots_ready(c.host_ids)], ready))
        if now:
            self._launch(now, ready)

    def poll(self) -> list[JobResult]:
        self._release_deferred()
        results, self._done = self._done, []
        while self._in_flight:
            fence, jobs = self._in_flight[0]
            try:
                if not fence.query():
                    break
                results.extend(JobResult(job_id, True, num_bytes=n) for job_id, n in jobs)
            except Exception as exc:  # noqa: BLE001 - a CUDA error fails the jobs it hit
                results.extend(JobResult(job_id, False, error=_describe(exc)) for job_id, _ in jobs)
            self._in_flight.popleft()
        return results

    @property
    def num_pending(self) -> int:
        in_flight = sum(len(jobs) for _, jobs in self._in_flight)
        deferred = sum(len(jobs) for jobs, _ in self._deferred)
        return len(self._done) + in_flight + deferred

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        for jobs, _ in self._deferred:
            self._fail(jobs, f"{self.src_medium} -> {self.dst_medium} handler closed")
        self._deferred.clear()
        self._copy_lane.synchronize()
        self._kernel_lane.synchronize()

    # -- checking -----------------------------------------------------------------------------

    def _split(self, job: TransferJob) -> tuple[np.ndarray, np.ndarray]:
        """``(gpu block ids, host slot ids)`` of a job."""
        src = np.asarray(job.src_ids, dtype=np.int64)
        dst = np.asarray(job.dst_ids, dtype=np.int64)
        return (dst, src) if self._is_onboard else (src, dst)

    def _check(self, job: TransferJob) -> _Checked | None:
        error = self._find_error(job)
        if error is not None:
            self._done.append(JobResult(job.job_id, False, error=error))
            return None
        if job.num_blocks == 0:
            self._done.append(JobResult(job.job_id, True))
            return None
        return _Checked(job, *self._split(job))

    def _find_error(self, job: TransferJob) -> str | None:
        if (job.src, job.dst) != (self.src_medium, self.dst_medium):
            return (
                f"job {job.job_id}: a {job.src} -> {job.dst} job was sent to the "
                f"{self.src_medium} -> {self.dst_medium} handler"
            )
        gpu_ids, host_ids = self._split(job)
        for name, ids, limit in (
            ("gpu block", gpu_ids, self._pool.num_blocks),
            ("cpu slot", host_ids, self._host.num_slots),
        ):
            bad = ids[(ids < 0) | (ids >= limit)]
            if bad.size:
                return f"job {job.job_id}: {name} {int(bad[0])} is out of range 0..{limit - 1}"
        page_error = self._pool.find_error(job.job_id, gpu_ids, self._is_onboard)
        if page_error is not None:
            return page_error
        dst_name, dst_ids = ("gpu block", gpu_ids) if self._is_onboard else ("cpu slot", host_ids)
        unique, counts = np.unique(dst_ids, return_counts=True)
        if unique.size != dst_ids.size:
            twice = int(unique[counts > 1][0])
            return f"job {job.job_id}: destination {dst_name} {twice} is named more than once"
        return None

    def _fail(self, jobs: list[_Checked], error: str) -> None:
        self._done.extend(JobResult(c.job.job_id, False, error=error) for c in jobs)

    # -- launching ----------------------------------------------------------------------------

    def _release_deferred(self) -> None:
        if not self._deferred:
            return
        batches, self._deferred = self._deferred, []
        failure = self._host.failure
        for jobs, ready in batches:
            if failure is not None:
                self._fail(jobs, failure)
            else:
                self._launch_pinned(jobs, ready)

    def _lanes(self) -> tuple[Lane, Lane]:
        if self._is_onboard:
            return self._copy_lane, self._kernel_lane
        return self._kernel_lane, self._copy_lane

    def _launch(self, jobs: list[_Checked], ready: Any) -> None:
        """Enqueue every block of ``jobs``; a job is done when the chunk holding its last block is."""
        orders = [np.argsort(c.host_ids, kind="stable") for c in jobs]
        gpu_ids = np.concatenate([c.gpu_ids[o] for c, o in zip(jobs, orders, strict=True)])
        host_ids = np.concatenate([c.host_ids[o] for c, o in zip(jobs, orders, strict=True)])
        job_ends = np.cumsum([c.job.num_blocks for c in jobs])
        owed = [(c.job.job_id, c.job.num_blocks * self._bytes_per_block) for c in jobs]
        second = self._lanes()[1]
        num_blocks = gpu_ids.size
        num_recorded = 0
        try:
            self._copy_lane.wait(ready)
            self._kernel_lane.wait(ready)
            ids = np.concatenate([gpu_ids, host_ids]) if self.is_zero_copy_enabled else gpu_ids
            device_ids = upload_ids(ids, self._kernel_lane)
            for start in range(0, num_blocks, self.rows_per_buffer):
                stop = min(start + self.rows_per_buffer, num_blocks)
                device_slots = device_ids[num_blocks + start : num_blocks + stop] if self.is_zero_copy_enabled else None
                block_ids = self._pool.chunk_ids(device_ids[start:stop], gpu_ids[start:stop], self._kernel_lane)
                self._launch_chunk(block_ids, host_ids[start:stop], device_slots)
                num_ended = int(np.searchsorted(job_ends, stop, side="right"))
                if num_ended > num_recorded:
                    self._in_flight.append((second.record(), owed[num_recorded:num_ended]))
                    num_recorded = num_ended
        except Exception as exc:  # noqa: BLE001 - reported as failed jobs, never raised
            error = _describe(exc)
            self._done.extend(JobResult(job_id, False, error=error) for job_id, _ in owed[num_recorded:])

    def _launch_chunk(self, block_ids: Any, slot_ids: np.ndarray, device_slots: torch.Tensor | None) -> None:
        runs = host_runs(slot_ids, self._slots_per_range)
        if device_slots is not None and _is_fragmented(runs, slot_ids.size * self._bytes_per_block):
            self._launch_zero_copy(block_ids, device_slots)
            return
        buffer = self._next_buffer
        self._next_buffer ^= 1
        rows = self._staging[buffer][: slot_ids.size]
        first, second = self._lanes()
        first.wait(self._free[buffer])
        with first.active():
            self._first_step(block_ids, runs, rows)
        staged = first.record()
        second.wait(staged)
        with second.active():
            self._second_step(block_ids, runs, rows)
        self._free[buffer] = second.record()

    def _launch_zero_copy(self, block_ids: torch.Tensor, device_slots: torch.Tensor) -> None:
        """One kernel between the pool and the host slots; no staging, no copy engine."""
        with self._kernel_lane.active():
            if self._is_onboard:
                self._pool.from_host(block_ids, device_slots, self._host.rows)
            else:
                self._pool.to_host(block_ids, device_slots, self._host.rows)
        if not self._is_onboard:  # completions are recorded on the copy lane
            self._copy_lane.wait(self._kernel_lane.record())

    def _copy_runs(self, runs: list[tuple[int, int, int]], rows: torch.Tensor, to_host: bool) -> None:
        host_rows = self._host.rows
        for slot, row, length in runs:
            host = host_rows[slot : slot + length]
            staged = rows[row : row + length]
            if to_host:
                host.copy_(staged, non_blocking=True)
            else:
                staged.copy_(host, non_blocking=True)

    def _first_step(self, block_ids: Any, runs: list[tuple[int, int, int]], rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _second_step(self, block_ids: Any, runs: list[tuple[int, int, int]], rows: torch.Tensor) -> None:
        raise NotImplementedError


class GpuToHostHandler(_BlockCopyHandler):
    """Offload: gather on the kernel stream, then device-to-host copies on the copy stream."""

    src_medium = GPU
    dst_medium = CPU
    _is_onboard = False

    def _first_step(self, block_ids: Any, runs: list[tuple[int, int, int]], rows: torch.Tensor) -> None:
        self._pool.gather(block_ids, rows)

    def _second_step(self, block_ids: Any, runs: list[tuple[int, int, int]], rows: torch.Tensor) -> None:
        self._copy_runs(runs, rows, to_host=True)


class HostToGpuHandler(_BlockCopyHandler):
    """Onboard: host-to-device copies on the copy stream, then a scatter on the kernel stream."""

    src_medium = CPU
    dst_medium = GPU
    _is_onboard = True

    def _first_step(self, block_ids: Any, runs: list[tuple[int, int, int]], rows: torch.Tensor) -> None:
        self._copy_runs(runs, rows, to_host=False)

    def _second_step(self, block_ids: Any, runs: list[tuple[int, int, int]], rows: torch.Tensor) -> None:
        self._pool.scatter(block_ids, rows)


def _is_fragmented(runs: list[tuple[int, int, int]], num_bytes: int) -> bool:
    """Many short host runs: one copy each would cost more than the zero-copy kernel."""
    return len(runs) > 1 and num_bytes / len(runs) < ZERO_COPY_BELOW_RUN_BYTES


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
