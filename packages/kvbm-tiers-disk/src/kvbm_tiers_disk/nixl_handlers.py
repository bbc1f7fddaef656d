"""Host <-> disk transfer handlers on NIXL (``disk_backend=nixl``): same slots, same checks.

Runs in each worker process. Both handlers implement ``kvbm_core.TransferHandler`` like the
thread-pool handlers in ``handlers.py`` and keep the same on-disk slot format and integrity
guarantees; only the I/O goes through NIXL's POSIX backend (Linux AIO under it):

- ``NixlHostToDiskHandler`` (cpu -> disk): copies each host row behind its header (packed by
  ``DiskStorage.prepare_write``) into a staging slot, then writes a batch of slots with one
  NIXL transfer request; each block is listed in the index when its request completes.
- ``NixlDiskToHostHandler`` (disk -> cpu): reads a batch of slots into staging slots with one
  request; when it completes each slot is verified (``DiskStorage.verify_read``) in staging
  and only a verified block is copied into its host row. A block that fails verification or
  whose read fails fails its job and is named in ``bad_block_hashes``; its row is untouched.

``submit`` never blocks: it queues the jobs and starts as many blocks as there are free
staging slots (``num_staging_slots``, registered with NIXL once) in one request. ``poll``
checks the requests in flight without blocking, finishes the completed ones, starts queued
blocks and returns each finished job once. NIXL errors fail jobs (counted in
``storage.stats`` as I/O errors); nothing raises into the engine.

A write's copy into staging and header packing run on the thread that calls
``submit``/``poll``; a read's verification and copy run on a few worker threads, blocks in
parallel, so the device is refilled while they hash. ``ready`` may be ``None``,
anything with ``query()`` (a ``torch.cuda.Event``) or ``wait(timeout)`` (a
``threading.Event``), both checked without blocking; a fence with only ``synchronize()`` or
a call is waited for when its job's first block starts.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbm_core.transfer import CPU, DISK, JobResult, TransferJob
from kvbm_tiers_disk.buffers import aligned_array
from kvbm_tiers_disk.handlers import (
    DEFAULT_IO_THREADS,
    READY_TIMEOUT_S,
    DiskHandlerBase,
    _JobState,
    host_rows,
)
from kvbm_tiers_disk.nixl_io import NixlFileIo, NixlIoError
from kvbm_tiers_disk.slot_format import HEADER_BYTES
from kvbm_tiers_disk.storage import DiskBlockError, DiskStorage

__all__ = ["NixlHostToDiskHandler", "NixlDiskToHostHandler", "NixlDiskHandler"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0
_agent_ids = itertools.count()


@dataclass
class _Queued:
    state: _JobState
    ready: Any
    deadline: float
    next_index: int = 0
    is_ready: bool = False


@dataclass
class _Block:
    state: _JobState
    index: int
    slot: int
    staging: int
    checksum: int = 0


@dataclass
class _Request:
    handle: Any
    blocks: list[_Block]


class NixlDiskHandler(DiskHandlerBase):
    """Batches blocks into NIXL transfer requests through registered staging slots."""

    is_write: bool

    def __init__(
        self,
        host: np.ndarray | None,
        storage: DiskStorage,
        num_staging_slots: int = DEFAULT_IO_THREADS,
        blocks_per_request: int | None = None,
    ) -> None:
        self.host = host_rows(host, storage)
        num_rows = self.host.shape[0]
        if self.is_write:
            super().__init__(storage, num_rows, storage.num_slots)
        else:
            super().__init__(storage, storage.num_slots, num_rows)
        stride = storage.geometry.stride
        self._staging = aligned_array(num_staging_slots * stride).reshape(num_staging_slots, stride)
        name = f"kvbm-disk-{self.src_medium}2{self.dst_medium}-{os.getpid()}-{next(_agent_ids)}"
        self._io = NixlFileIo(
            name, storage.fd, storage.geometry.file_bytes(storage.num_slots), self._staging
        )
        # Several smaller requests in flight keep the device busy while finished ones are
        # verified and refilled; one request of every slot would drain before the next starts.
        self._blocks_per_request = blocks_per_request or max(1, num_staging_slots // 4)
        self._free = list(range(num_staging_slots))
        self._free_lock = threading.Lock()  # workers hand staging slots back
        # Reads are verified and copied on a few workers, in parallel and off the polling
        # thread, so the device is refilled while they hash.
        self._workers = (
            None
            if self.is_write
            else ThreadPoolExecutor(
                min(4, os.cpu_count() or 1), thread_name_prefix="kvbm-nixl-verify"
            )
        )
        self._queue: deque[_Queued] = deque()
        self._requests: list[_Request] = []
        # submit and poll may come from different threads; NIXL calls happen under this lock.
        self._io_lock = threading.RLock()

    # ------------------------------------------------------------------ protocol

    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for job in jobs:
            state = self._accept(job)
            if state is None:
                continue
            queued = _Queued(state, ready, deadline, is_ready=ready is None)
            with self._io_lock:
                self._queue.append(queued)
                if self._is_closed:  # close() ran after the job was checked
                    self._fail_queued(queued, "the disk tier handler is closed")
        self._start_queued()

    def poll(self) -> list[JobResult]:
        self._reap()
        self._start_queued()
        return super().poll()

    def close(self) -> None:
        """Let the requests in flight finish (up to ``CLOSE_TIMEOUT_S``), fail what is still
        queued, and free NIXL's registrations; idempotent."""
        with self._io_lock:
            if self._is_closed:
                return
            self._is_closed = True
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while self._requests and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.001)
            for request in self._requests:  # stuck: cancel, and never touch their slots again
                self._io.release(request.handle)
                self.storage.end_io()
                for block in request.blocks:
                    self._complete_block(
                        block.state, block.index, "the disk tier handler was closed", False
                    )
            self._requests.clear()
            while self._queue:
                queued = self._queue.popleft()
                for index in range(queued.next_index, queued.state.job.num_blocks):
                    self._complete_block(
                        queued.state,
                        index,
                        "the disk tier handler was closed before this block ran",
                        False,
                    )
            if self._workers is not None:
                self._workers.shutdown(wait=True)  # verifications still running finish
            self._io.close()

    # ------------------------------------------------------------------ batches

    def _start_queued(self) -> None:
        with self._io_lock:
            blocks: list[_Block] = []
            while self._queue and self._has_free() and not self._is_closed:
                if len(blocks) == self._blocks_per_request:
                    self._post(blocks)
                    blocks = []
                queued = self._queue[0]
                if not self._check_ready(queued):
                    break  # jobs start in order: one still waiting holds back those behind it
                state, index = queued.state, queued.next_index
                queued.next_index += 1
                if queued.next_index == state.job.num_blocks:
                    self._queue.popleft()
                block = self._prepare(state, index)
                if block is not None:
                    blocks.append(block)
            if blocks:
                self._post(blocks)

    def _check_ready(self, queued: _Queued) -> bool:
        if queued.is_ready:
            return True
        try:
            queued.is_ready = _is_fired(queued.ready)
        except Exception as exc:
            self._fail_queued(queued, f"source fence failed: {type(exc).__name__}: {exc}")
            return False
        if not queued.is_ready and time.monotonic() > queued.deadline:
            self._fail_queued(queued, f"source not ready after {READY_TIMEOUT_S:.0f} s")
        return queued.is_ready

    def _fail_queued(self, queued: _Queued, error: str) -> None:
        self._queue.remove(queued)
        for index in range(queued.next_index, queued.state.job.num_blocks):
            self._complete_block(queued.state, index, error, False)

    def _prepare(self, state: _JobState, index: int) -> _Block | None:
        job = state.job
        with self._free_lock:
            staging = self._free.pop()
        slot = job.dst_ids[index] if self.is_write else job.src_ids[index]
        block = _Block(state, index, slot, staging)
        if not self.is_write:
            return block
        buffer = self._staging[staging]
        num_bytes = self.storage.geometry.bytes_per_block
        buffer[HEADER_BYTES : HEADER_BYTES + num_bytes] = self.host[job.src_ids[index]]
        try:
            block.checksum = self.storage.prepare_write(slot, self._block_hash(job, index), buffer)
        except DiskBlockError as exc:
            self._give_back(staging)
            self._complete_block(state, index, str(exc), exc.is_corrupt)
            return None
        return block

    def _post(self, blocks: list[_Block]) -> None:
        io_bytes = self.storage.io_bytes
        offset = self.storage.geometry.offset
        pieces = [(self._staging[b.staging].ctypes.data, offset(b.slot), io_bytes) for b in blocks]
        try:
            self.storage.begin_io()
        except DiskBlockError as exc:
            self._finish_blocks(blocks, str(exc))
            return
        try:
            handle = self._io.post(self.is_write, pieces)
        except NixlIoError as exc:
            self.storage.end_io()
            self._fail_io(blocks, str(exc))
            return
        self._requests.append(_Request(handle, blocks))

    def _reap(self) -> None:
        with self._io_lock:
            for request in list(self._requests):
                status, error = self._io.state(request.handle)
                if status == "PROC":
                    continue
                self._requests.remove(request)
                self._io.release(request.handle)
                self.storage.end_io()
                if error is not None:
                    self._fail_io(request.blocks, error)
                elif self._workers is None:
                    self._complete(request.blocks)
                else:
                    for block in request.blocks:
                        self._workers.submit(self._complete, [block])

    def _has_free(self) -> bool:
        with self._free_lock:
            return bool(self._free)

    def _give_back(self, staging: int) -> None:
        with self._free_lock:
            self._free.append(staging)

    def _complete(self, blocks: list[_Block]) -> None:
        for block in blocks:
            job = block.state.job
            error, is_corrupt = None, False
            try:
                self._complete_one(block, job)
            except DiskBlockError as exc:
                error, is_corrupt = str(exc), exc.is_corrupt
            except Exception as exc:  # never let a bug escape into the engine
                log.exception(
                    "kvbm disk tier: NIXL %s -> %s block failed", self.src_medium, self.dst_medium
                )
                error = f"{type(exc).__name__}: {exc}"
            self._give_back(block.staging)
            self._complete_block(block.state, block.index, error, is_corrupt)

    def _complete_one(self, block: _Block, job: TransferJob) -> None:
        block_hash = self._block_hash(job, block.index)
        if self.is_write:
            self.storage.complete_write(block.slot, block_hash, block.checksum)
            return
        buffer = self._staging[block.staging]
        payload = self.storage.verify_read(block.slot, block_hash, buffer, self.storage.io_bytes)
        self.host[job.dst_ids[block.index]] = payload

    def _fail_io(self, blocks: list[_Block], error: str) -> None:
        op = "write" if self.is_write else "read"
        for block in blocks:
            failure = self.storage.io_failure(op, block.slot, OSError(errno.EIO, error))
            self._give_back(block.staging)
            self._complete_block(block.state, block.index, str(failure), failure.is_corrupt)

    def _finish_blocks(self, blocks: list[_Block], error: str) -> None:
        for block in blocks:
            self._give_back(block.staging)
            self._complete_block(block.state, block.index, error, False)


def _is_fired(ready: Any) -> bool:
    if ready is None:
        return True
    if hasattr(ready, "query"):
        return bool(ready.query())
    if hasattr(ready, "is_set"):
        return bool(ready.is_set())
    if hasattr(ready, "wait"):
        return bool(ready.wait(0))
    if hasattr(ready, "synchronize"):
        ready.synchronize()
        return True
    if callable(ready):
        ready()
        return True
    raise TypeError(f"unsupported ready fence {type(ready).__name__}")


class NixlHostToDiskHandler(NixlDiskHandler):
    src_medium = CPU
    dst_medium = DISK
    is_write = True


class NixlDiskToHostHandler(NixlDiskHandler):
    src_medium = DISK
    dst_medium = CPU
    is_write = False
