"""Moving blocks to and from Mooncake Store, asynchronously on one thread per handler (workers).

``MooncakeHandler(storage, blocks, is_store)`` moves ``blocks`` (the GPU pool or the host tier)
-> store when ``is_store``, else store -> GPU. ``submit`` queues jobs on the handler's thread;
``poll`` hands back finished jobs in submission order.

Each job goes in batches of at most ``batch_blocks`` values through a staging buffer registered
with the store client once (``batch_put_from`` / ``batch_get_into``: one round trip per batch).
A store writes each value's header (block hash, key, layout, length, checksum) in front of the
block's bytes. A load checks every value of a batch before it writes a byte to the GPU: a
value that is missing (evicted since the leader's lookup, or the master lost it) or fails its
header or checksum fails the job and is named in ``bad_block_hashes``, so the leader forgets
it and the engine recomputes. A store that cannot be reached fails jobs at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvbm_core.transfer import GPU, JobResult, TransferHandler, TransferJob
from kvbm_tiers_mooncake.blocks import HostBlocks, PoolBlocks
from kvbm_tiers_mooncake.storage import MooncakeStorage
from kvbm_tiers_mooncake.value_format import (
    HEADER_BYTES,
    CorruptValueError,
    check_value,
    pack_header,
)

__all__ = ["MooncakeHandler", "DEFAULT_BATCH_BLOCKS"]

DEFAULT_BATCH_BLOCKS = 32


class MooncakeHandler(TransferHandler):
    def __init__(
        self,
        storage: MooncakeStorage,
        blocks: PoolBlocks | HostBlocks,
        is_store: bool,
        medium: str = GPU,
        batch_blocks: int = DEFAULT_BATCH_BLOCKS,
    ) -> None:
        self.src_medium, self.dst_medium = (
            (medium, storage.medium) if is_store else (storage.medium, medium)
        )
        self._storage = storage
        self._blocks = blocks
        self._is_store = is_store
        self._batch = batch_blocks
        self._stride = HEADER_BYTES + storage.layout.bytes_per_block
        is_pinned = isinstance(blocks, PoolBlocks) and blocks.is_cuda
        self._staging = torch.empty(
            (batch_blocks, self._stride), dtype=torch.uint8, pin_memory=is_pinned
        )
        self._values = self._staging.numpy()
        self._address = self._staging.data_ptr()
        self._worker = ThreadPoolExecutor(
            1, thread_name_prefix=f"kvbm-{self.src_medium}-{self.dst_medium}"
        )
        self._in_flight: deque[Future[JobResult]] = deque()
        self._is_closed = False

    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        for job in jobs:
            if self._is_closed:
                future: Future[JobResult] = Future()
                future.set_result(JobResult(job.job_id, False, error="handler is closed"))
            else:
                future = self._worker.submit(self._run, job, ready)
            self._in_flight.append(future)

    def poll(self) -> list[JobResult]:
        results = []
        while self._in_flight and self._in_flight[0].done():
            results.append(self._in_flight.popleft().result())
        return results

    @property
    def num_pending(self) -> int:
        return len(self._in_flight)

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._worker.shutdown(wait=True)
        self._storage.unregister(self._address)

    # --- on the handler's thread -----------------------------------------------------------

    def _run(self, job: TransferJob, ready: Any) -> JobResult:
        try:
            block_ids, slot_ids = (
                (job.src_ids, job.dst_ids) if self._is_store else (job.dst_ids, job.src_ids)
            )
            error = _check_job(
                job, block_ids, self._blocks.num_slots, slot_ids, self._storage.num_slots
            )
            if error:
                return JobResult(job.job_id, False, error=f"job {job.job_id}: {error}")
            store = self._storage.register(self._address, self._staging.numel())
            if store is None:
                return JobResult(
                    job.job_id, False, error=f"job {job.job_id}: Mooncake Store unreachable"
                )
            for start in range(0, job.num_blocks, self._batch):
                end = min(start + self._batch, job.num_blocks)
                ids, hashes = block_ids[start:end], job.block_hashes[start:end]
                move = self._put if self._is_store else self._get
                failure = move(store, ids, hashes, ready)
                if failure is not None:
                    error, bad = failure
                    return JobResult(
                        job.job_id, False, error=f"job {job.job_id}: {error}", bad_block_hashes=bad
                    )
            return JobResult(
                job.job_id, True, num_bytes=job.num_blocks * self._storage.layout.bytes_per_block
            )
        except Exception as exc:  # a job fails as a result, never into the engine
            return JobResult(
                job.job_id, False, error=f"job {job.job_id}: {type(exc).__name__}: {exc}"
            )

    def _pointers(self, count: int) -> tuple[list[int], list[int]]:
        return [self._address + i * self._stride for i in range(count)], [self._stride] * count

    def _put(
        self, store: Any, ids: Sequence[int], hashes: Sequence[int], ready: Any
    ) -> tuple[str, tuple[int, ...]] | None:
        count = len(ids)
        self._blocks.gather(ids, self._staging[:count, HEADER_BYTES:], ready)
        keys = self._storage.keys.keys(hashes, self._storage.rank)
        for i, (block_hash, key) in enumerate(zip(hashes, keys, strict=True)):
            value = self._values[i]
            pack_header(
                value[:HEADER_BYTES], block_hash, key, self._storage.layout_fp, value[HEADER_BYTES:]
            )
        codes = store.batch_put_from(keys, *self._pointers(count))
        failed = [code for code in codes if code != 0]
        if failed:
            return f"{len(failed)} of {count} puts failed (Mooncake code {failed[0]})", ()
        return None

    def _get(
        self, store: Any, ids: Sequence[int], hashes: Sequence[int], ready: Any
    ) -> tuple[str, tuple[int, ...]] | None:
        count = len(ids)
        keys = self._storage.keys.keys(hashes, self._storage.rank)
        codes = store.batch_get_into(keys, *self._pointers(count))
        missing, corrupt = [], []
        for i, (block_hash, key, code) in enumerate(zip(hashes, keys, codes, strict=True)):
            if code != self._stride:
                missing.append(block_hash)
                continue
            try:
                check_value(self._values[i], block_hash, key, self._storage.layout_fp)
            except CorruptValueError:
                corrupt.append(block_hash)
        if missing or corrupt:
            # Nothing of this batch reaches the GPU: the leader forgets these blocks.
            return (
                f"{len(missing)} block(s) missing from the store (first code "
                f"{next((c for c in codes if c != self._stride), 0)}), {len(corrupt)} corrupt",
                tuple(missing + corrupt),
            )
        self._blocks.scatter(ids, self._staging[:count, HEADER_BYTES:])
        return None


def _check_job(
    job: TransferJob,
    block_ids: Sequence[int],
    num_blocks: int,
    slot_ids: Sequence[int],
    num_slots: int,
) -> str | None:
    if len(job.block_hashes) != job.num_blocks:
        return "the mooncake tier keys values by block hash; the job names none"
    bad = [i for i in block_ids if not 0 <= i < num_blocks]
    if bad:
        return f"block id(s) {bad[:4]} outside 0..{num_blocks - 1}"
    bad = [i for i in slot_ids if not 0 <= i < num_slots]
    return f"presence slot(s) {bad[:4]} outside 0..{num_slots - 1}" if bad else None
