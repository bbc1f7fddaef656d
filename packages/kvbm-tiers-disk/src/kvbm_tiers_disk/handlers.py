"""Transfer handlers of the disk tier: host <-> disk and GPU <-> disk.

Runs in each worker process. Every handler implements ``kvbm_core.TransferHandler``:
``submit`` checks the jobs and queues one task per block on the handler's own thread pool
(``os.preadv``/``os.pwritev``, xxhash and tensor copies release the GIL, so blocks of one job
and of many jobs are in flight together) and returns at once; ``poll`` returns each finished
job once; nothing raises into the engine: a bad job or a failed block fails its job.

- ``HostToDiskHandler`` (cpu -> disk): copies each host-tier row behind a header in the I/O
  thread's slot buffer and writes both as one I/O (a separate 4 KiB piece halves the
  throughput of some devices).
- ``DiskToHostHandler`` (disk -> cpu): reads each block into the I/O thread's slot buffer,
  verifies it and only then copies it into the host-tier row; a block that fails
  verification fails the job, is named in ``bad_block_hashes`` and leaves its row untouched.
- ``GpuToDiskHandler`` (gpu -> disk): copies the block out of the GPU pool (gathering the
  layers of a layer-separate pool) into the I/O thread's bounce buffer (pinned on a GPU
  machine), then writes it.
- ``DiskToGpuHandler`` (disk -> gpu): reads into the bounce buffer, verifies it there, and
  only then scatters it into the GPU pool: unverified bytes never reach the pool.

GPUDirect Storage is not used yet: GPU <-> disk always goes through host memory.

``ready`` (see ``kvbm_core.transfer``) may be ``None``, a ``torch.cuda.Event`` (GPU copies
wait for it on their own stream), or anything with ``synchronize()``, ``wait()`` or a call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm_core.layout import LayoutKind
from kvbm_core.transfer import CPU, DISK, GPU, DevicePool, JobResult, TransferHandler, TransferJob
from kvbm_tiers_disk.buffers import aligned_tensor
from kvbm_tiers_disk.slot_format import HEADER_BYTES
from kvbm_tiers_disk.storage import DiskBlockError, DiskStorage

__all__ = [
    "DiskHandlerBase",
    "DiskHandler",
    "HostToDiskHandler",
    "DiskToHostHandler",
    "GpuToDiskHandler",
    "DiskToGpuHandler",
    "PoolRows",
    "DEFAULT_IO_THREADS",
]

log = logging.getLogger(__name__)

DEFAULT_IO_THREADS = 16
READY_TIMEOUT_S = 600.0


@dataclass
class _JobState:
    job: TransferJob
    num_left: int
    num_failed: int = 0
    first_error: str | None = None
    bad_block_hashes: list[int] = field(default_factory=list)


class DiskHandlerBase(TransferHandler):
    """What every disk tier handler shares: job checks, per-block outcomes folded into job
    results, ``poll`` and ``num_pending``. Subclasses move the blocks."""

    src_medium: str
    dst_medium: str

    def __init__(self, storage: DiskStorage, num_src_ids: int, num_dst_ids: int) -> None:
        self.storage = storage
        self._num_ids = {"src": num_src_ids, "dst": num_dst_ids}
        self._lock = threading.Lock()
        self._done: deque[JobResult] = deque()
        self._num_pending = 0
        self._is_closed = False

    def _accept(self, job: TransferJob) -> _JobState | None:
        """Count ``job`` as pending; its state, or ``None`` when it is already finished
        (refused, or without blocks)."""
        with self._lock:
            self._num_pending += 1
        problem = self._check_job(job)
        if problem is not None:
            self._finish(JobResult(job.job_id, False, error=problem))
            return None
        if job.num_blocks == 0:
            self._finish(JobResult(job.job_id, True))
            return None
        return _JobState(job, num_left=job.num_blocks)

    def _finish(self, result: JobResult) -> None:
        with self._lock:
            self._done.append(result)

    def poll(self) -> list[JobResult]:
        with self._lock:
            results = list(self._done)
            self._done.clear()
            self._num_pending -= len(results)
        return results

    @property
    def num_pending(self) -> int:
        with self._lock:
            return self._num_pending

    def _check_job(self, job: TransferJob) -> str | None:
        if (job.src, job.dst) != (self.src_medium, self.dst_medium):
            return f"job {job.job_id} is {job.src} -> {job.dst}, this handler moves {self.src_medium} -> {self.dst_medium}"
        if self._is_closed:
            return "the disk tier handler is closed"
        for side, ids in (("src", job.src_ids), ("dst", job.dst_ids)):
            limit = self._num_ids[side]
            bad = [i for i in ids if not 0 <= i < limit]
            if bad:
                return f"job {job.job_id}: {side} ids {bad[:4]} out of range 0..{limit - 1}"
        if len(set(job.dst_ids)) != len(job.dst_ids):
            return f"job {job.job_id}: a destination id appears twice"
        return None

    def _complete_block(
        self, state: _JobState, index: int, error: str | None, is_corrupt: bool
    ) -> None:
        job = state.job
        with self._lock:
            if error is not None:
                state.num_failed += 1
                state.first_error = state.first_error or error
                if is_corrupt and job.block_hashes:
                    state.bad_block_hashes.append(job.block_hashes[index])
            state.num_left -= 1
            if state.num_left:
                return
            self._done.append(_result(state, self.storage.geometry.bytes_per_block))

    @staticmethod
    def _block_hash(job: TransferJob, index: int) -> int | None:
        return job.block_hashes[index] if job.block_hashes else None


class DiskHandler(DiskHandlerBase):
    """Runs one task per block on a thread pool and folds the outcomes into job results."""

    def __init__(
        self, storage: DiskStorage, num_src_ids: int, num_dst_ids: int, num_threads: int
    ) -> None:
        super().__init__(storage, num_src_ids, num_dst_ids)
        self._pool = ThreadPoolExecutor(
            num_threads, thread_name_prefix=f"kvbm-{self.src_medium}2{self.dst_medium}"
        )

    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        for job in jobs:
            state = self._accept(job)
            if state is None:
                continue
            for index in range(job.num_blocks):
                try:
                    self._pool.submit(self._run_block, state, index, ready)
                except RuntimeError:  # the pool was shut down by close()
                    self._complete_block(state, index, "the disk tier handler is closed", False)

    def close(self) -> None:
        self._is_closed = True
        self._pool.shutdown(wait=True)

    def _run_block(self, state: _JobState, index: int, ready: Any) -> None:
        error, is_corrupt = None, False
        try:
            if self._is_closed:  # close() fails what is still queued instead of running it
                raise DiskBlockError("the disk tier handler was closed before this block ran")
            self._move_block(state.job, index, ready)
        except DiskBlockError as exc:
            error, is_corrupt = str(exc), exc.is_corrupt
        except Exception as exc:  # never let a bug or a driver error escape into the engine
            log.exception("kvbm disk tier: %s -> %s block failed", self.src_medium, self.dst_medium)
            error = f"{type(exc).__name__}: {exc}"
        self._complete_block(state, index, error, is_corrupt)

    def _move_block(self, job: TransferJob, index: int, ready: Any) -> None:
        raise NotImplementedError

    def _wait_ready(self, ready: Any, stream: Any = None) -> None:
        """Block this I/O thread (or only ``stream``, for a CUDA event) until ``ready`` fires."""
        if ready is None:
            return
        if stream is not None:
            import torch

            if isinstance(ready, torch.cuda.Event):
                stream.wait_event(ready)
                return
        if hasattr(ready, "synchronize"):
            ready.synchronize()
        elif hasattr(ready, "wait"):
            self._wait_event(ready)
        elif callable(ready):
            ready()
        else:
            raise DiskBlockError(f"unsupported ready fence {type(ready).__name__}")

    def _wait_event(self, ready: Any) -> None:
        # In slices, so close() is not held up by a fence that never fires.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.wait(0.05):
            if self._is_closed:
                raise DiskBlockError(
                    "the disk tier handler was closed while waiting for its source"
                )
            if time.monotonic() > deadline:
                raise DiskBlockError(f"source not ready after {READY_TIMEOUT_S:.0f} s")


def _result(state: _JobState, bytes_per_block: int) -> JobResult:
    job = state.job
    if not state.num_failed:
        return JobResult(job.job_id, True, num_bytes=job.num_blocks * bytes_per_block)
    error = f"{state.num_failed} of {job.num_blocks} blocks failed; first: {state.first_error}"
    return JobResult(job.job_id, False, error=error, bad_block_hashes=tuple(state.bad_block_hashes))


# ---------------------------------------------------------------------- host <-> disk


def host_rows(host: np.ndarray | None, storage: DiskStorage) -> np.ndarray:
    bytes_per_block = storage.geometry.bytes_per_block
    if host is None or host.ndim != 2 or host.dtype != np.uint8:
        raise ValueError(
            "the cpu tier must expose host_view() as a [num_slots, bytes_per_block] uint8 array"
        )
    if host.shape[1] != bytes_per_block:
        raise ValueError(
            f"cpu tier blocks are {host.shape[1]} bytes but disk tier blocks are "
            f"{bytes_per_block}; both tiers must use the same layout"
        )
    return host


class HostToDiskHandler(DiskHandler):
    src_medium = CPU
    dst_medium = DISK

    def __init__(
        self, host: np.ndarray | None, storage: DiskStorage, num_threads: int = DEFAULT_IO_THREADS
    ):
        self.host = host_rows(host, storage)
        super().__init__(storage, self.host.shape[0], storage.num_slots, num_threads)

    def _move_block(self, job: TransferJob, index: int, ready: Any) -> None:
        self._wait_ready(ready)
        self.storage.write_block(
            job.dst_ids[index], self._block_hash(job, index), self.host[job.src_ids[index]]
        )


class DiskToHostHandler(DiskHandler):
    src_medium = DISK
    dst_medium = CPU

    def __init__(
        self, host: np.ndarray | None, storage: DiskStorage, num_threads: int = DEFAULT_IO_THREADS
    ):
        self.host = host_rows(host, storage)
        super().__init__(storage, storage.num_slots, self.host.shape[0], num_threads)

    def _move_block(self, job: TransferJob, index: int, ready: Any) -> None:
        self._wait_ready(ready)
        self.storage.read_block(
            job.src_ids[index], self._block_hash(job, index), self.host[job.dst_ids[index]]
        )


# ---------------------------------------------------------------------- GPU <-> disk


class PoolRows:
    """The GPU pool as byte rows: one ``[num_blocks, bytes_per_block]`` view (fully
    contiguous) or one ``[num_blocks, bytes_per_layer]`` view per layer (layer separate)."""

    def __init__(self, pool: DevicePool, bytes_per_block: int) -> None:
        layout = pool.layout
        if layout.bytes_per_block != bytes_per_block:
            raise ValueError(
                f"GPU pool blocks are {layout.bytes_per_block} bytes but disk tier blocks are "
                f"{bytes_per_block}; both must use the same layout"
            )
        expected = 1 if layout.kind is LayoutKind.FULLY_CONTIGUOUS else layout.num_layers
        if len(pool.tensors) != expected:
            raise ValueError(
                f"a {layout.kind.value} GPU pool has {expected} tensor(s), got {len(pool.tensors)}"
            )
        self.piece_bytes = bytes_per_block // expected
        self.views = [_byte_rows(t, self.piece_bytes) for t in pool.tensors]
        self.num_blocks = pool.num_slots
        self.device = pool.tensors[0].device
        self.is_cuda = self.device.type == "cuda"

    def gather(self, block_id: int, staging: Any) -> None:
        """Queue copies of block ``block_id`` into ``staging`` (on the current stream)."""
        for layer, view in enumerate(self.views):
            start = layer * self.piece_bytes
            staging[start : start + self.piece_bytes].copy_(view[block_id], non_blocking=True)

    def scatter(self, staging: Any, block_id: int) -> None:
        for layer, view in enumerate(self.views):
            start = layer * self.piece_bytes
            view[block_id].copy_(staging[start : start + self.piece_bytes], non_blocking=True)


def _byte_rows(tensor: Any, row_bytes: int) -> Any:
    import torch

    try:
        rows = tensor.view(torch.uint8).view(tensor.shape[0], -1)
    except RuntimeError as exc:
        raise ValueError(
            f"GPU pool tensor of shape {list(tensor.shape)} and strides {list(tensor.stride())} "
            f"is not contiguous within a block; the disk tier needs each block's bytes in one run ({exc})"
        ) from None
    if rows.shape[1] != row_bytes:
        raise ValueError(f"GPU pool rows are {rows.shape[1]} bytes, the layout says {row_bytes}")
    return rows


class _GpuDiskHandler(DiskHandler):
    def __init__(
        self, pool: DevicePool, storage: DiskStorage, num_threads: int = DEFAULT_IO_THREADS
    ):
        self.rows = PoolRows(pool, storage.geometry.bytes_per_block)
        self._local = threading.local()
        num_src, num_dst = (pool.num_slots, storage.num_slots)
        if self.dst_medium != DISK:
            num_src, num_dst = num_dst, num_src
        super().__init__(storage, num_src, num_dst, num_threads)

    def _staging(self) -> tuple[Any, np.ndarray]:
        """This thread's slot buffer as a tensor (the block's bytes, past the header) and as
        the numpy array the storage does I/O with; pinned when the pool is on a GPU."""
        staging = getattr(self._local, "staging", None)
        if staging is None:
            geometry = self.storage.geometry
            tensor = aligned_tensor(geometry.stride, pin=self.rows.is_cuda)
            array = self.storage.new_slot_buffer(lambda _: tensor.numpy())
            payload = tensor[HEADER_BYTES : HEADER_BYTES + geometry.bytes_per_block]
            staging = self._local.staging = (payload, array)
        return staging

    def _stream(self) -> Any:
        if not self.rows.is_cuda:
            return None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            import torch

            stream = self._local.stream = torch.cuda.Stream(self.rows.device)
        return stream

    def _run_copies(self, ready: Any, copy: Any) -> None:
        stream = self._stream()
        if stream is None:
            self._wait_ready(ready)
            copy()
            return
        import torch

        self._wait_ready(ready, stream)
        with torch.cuda.stream(stream):
            copy()
        stream.synchronize()


class GpuToDiskHandler(_GpuDiskHandler):
    src_medium = GPU
    dst_medium = DISK

    def _move_block(self, job: TransferJob, index: int, ready: Any) -> None:
        payload, buffer = self._staging()
        self._run_copies(ready, lambda: self.rows.gather(job.src_ids[index], payload))
        self.storage.write_slot(job.dst_ids[index], self._block_hash(job, index), buffer)


class DiskToGpuHandler(_GpuDiskHandler):
    src_medium = DISK
    dst_medium = GPU

    def _move_block(self, job: TransferJob, index: int, ready: Any) -> None:
        payload, buffer = self._staging()
        # read_slot verifies in the bounce buffer; only verified bytes are scattered.
        self.storage.read_slot(job.src_ids[index], self._block_hash(job, index), buffer)
        self._run_copies(ready, lambda: self.rows.scatter(payload, job.dst_ids[index]))
