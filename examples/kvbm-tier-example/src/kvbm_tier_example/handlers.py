"""GPU <-> mmap transfers on one background thread per direction.

``submit`` queues each job on the thread and returns; ``poll`` hands back finished jobs in
submission order. A store waits for the ``ready`` fence (a CUDA event) before reading the GPU
pool. Every job is checked against both storages' bounds first, so a bad id fails its job and
never reads or writes another block's bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from kvbm_core import GPU, DevicePool, JobResult, LayoutKind, Storage, TransferHandler, TransferJob


class MmapHandler(TransferHandler):
    def __init__(self, pool: DevicePool, mapped: Storage, store: bool) -> None:
        self.src_medium, self.dst_medium = (GPU, mapped.medium) if store else (mapped.medium, GPU)
        self._pool = pool
        self._mapped = mapped
        self._is_store = store
        self._pieces = [t.view(torch.uint8).reshape(t.shape[0], -1) for t in pool.tensors]
        if pool.layout.kind is LayoutKind.FULLY_CONTIGUOUS:
            assert len(self._pieces) == 1
        self._device = self._pieces[0].device
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        self._worker = ThreadPoolExecutor(
            1, thread_name_prefix=f"kvbm-{self.src_medium}-{self.dst_medium}"
        )
        self._in_flight: deque[tuple[TransferJob, Future[JobResult]]] = deque()
        self._closed = False

    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        for job in jobs:
            if self._closed:
                future: Future[JobResult] = Future()
                future.set_result(JobResult(job.job_id, False, error="handler is closed"))
            else:
                future = self._worker.submit(self._run, job, ready)
            self._in_flight.append((job, future))

    def poll(self) -> list[JobResult]:
        results = []
        while self._in_flight and self._in_flight[0][1].done():
            job, future = self._in_flight.popleft()
            results.append(future.result())
        return results

    @property
    def num_pending(self) -> int:
        return len(self._in_flight)

    def close(self) -> None:
        self._closed = True
        self._worker.shutdown(wait=True)

    # --- on the worker thread -------------------------------------------------------------

    def _run(self, job: TransferJob, ready: Any) -> JobResult:
        try:
            gpu_ids, slot_ids = (
                (job.src_ids, job.dst_ids) if self._is_store else (job.dst_ids, job.src_ids)
            )
            error = _out_of_range("GPU block", gpu_ids, self._pool.num_slots) or _out_of_range(
                "mmap slot", slot_ids, self._mapped.num_slots
            )
            if error:
                return JobResult(job.job_id, False, error=f"job {job.job_id}: {error}")
            if self._stream is None:
                self._move(gpu_ids, slot_ids, ready)
            else:
                with torch.cuda.stream(self._stream):
                    self._move(gpu_ids, slot_ids, ready)
                self._stream.synchronize()
            return JobResult(
                job.job_id, True, num_bytes=job.num_blocks * self._pool.layout.bytes_per_block
            )
        except Exception as exc:  # a job fails as a result, never into the engine
            return JobResult(
                job.job_id, False, error=f"job {job.job_id}: {type(exc).__name__}: {exc}"
            )

    def _move(self, gpu_ids: Sequence[int], slot_ids: Sequence[int], ready: Any) -> None:
        blocks = self._mapped.host_view()
        if blocks is None:
            raise RuntimeError("mmap storage is closed")
        index = torch.as_tensor(gpu_ids, dtype=torch.long, device=self._device)
        if self._is_store:
            if ready is not None:
                torch.cuda.current_stream().wait_event(ready)
            gathered = torch.cat([piece[index] for piece in self._pieces], dim=1)
            blocks[list(slot_ids)] = gathered.cpu().numpy()
            return
        staged = torch.from_numpy(np.ascontiguousarray(blocks[list(slot_ids)])).to(self._device)
        offset = 0
        for piece in self._pieces:
            piece[index] = staged[:, offset : offset + piece.shape[1]]
            offset += piece.shape[1]


def _out_of_range(what: str, ids: Sequence[int], limit: int) -> str | None:
    bad = [i for i in ids if not 0 <= i < limit]
    return f"{what} id(s) {bad[:4]} outside 0..{limit - 1}" if bad else None
