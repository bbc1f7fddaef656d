"""The worker-side transfer protocol: how a tier moves blocks.

Runs in each worker process (one per GPU rank). The leader plans ``TransferJob``s; the worker
hands them to the ``TransferHandler`` registered for the job's ``(src, dst)`` media.

Operations of a handler:
- ``submit(jobs, ready)``: start the jobs and return at once. ``ready`` is an opaque fence the
  jobs must wait for before reading their source (on a GPU, a CUDA event recorded after the
  forward pass); ``None`` means the source is ready now. Never blocks the caller on I/O.
- ``poll()``: the results of jobs that finished since the last poll, each job exactly once.
- ``num_pending``: jobs submitted and not yet returned by ``poll``.
- ``close()``: wait for or cancel what is in flight and free resources; idempotent.

A job fails as a whole (``JobResult.ok`` False with an ``error``); a tier that checks integrity
also names the blocks it found corrupt (``bad_block_hashes``) so the leader drops them. A failed
job must never leave wrong bytes where a later load would serve them as KV: a failed load leaves
its GPU blocks to be recomputed, a failed store leaves its slots unreadable.

``Storage`` is one rank's share of a tier: ``num_slots`` blocks of ``layout.bytes_per_block``
bytes. ``DevicePool`` is the engine's GPU pool wrapped as a storage (medium ``gpu``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm_core.layout import KvLayout

__all__ = [
    "GPU",
    "CPU",
    "DISK",
    "TransferJob",
    "JobResult",
    "Storage",
    "DevicePool",
    "TransferHandler",
    "TransferEngine",
    "NoHandlerError",
]

GPU = "gpu"
CPU = "cpu"
DISK = "disk"


@dataclass(frozen=True, slots=True)
class TransferJob:
    """Move ``len(src_ids)`` blocks: ``src_ids[i]`` of ``src`` into ``dst_ids[i]`` of ``dst``.

    Ids are GPU block ids for the ``gpu`` medium and slot numbers for a tier. ``block_hashes``
    names each block moved: the worker checks every block it reads from a tier against it
    before a byte is delivered. ``after_job_id`` chains a job behind another of the same plan
    (a host -> disk copy behind the GPU -> host store that fills its source): each rank starts
    it once its own copy of that job succeeded, and fails it if that job failed.
    ``request_id`` is the request whose GPU blocks the job reads or writes, if any.
    """

    job_id: int
    src: str
    dst: str
    src_ids: tuple[int, ...]
    dst_ids: tuple[int, ...]
    block_hashes: tuple[int, ...] = ()
    after_job_id: int | None = None
    request_id: int | None = None

    def __post_init__(self) -> None:
        if len(self.src_ids) != len(self.dst_ids):
            raise ValueError(
                f"job {self.job_id}: {len(self.src_ids)} source ids for {len(self.dst_ids)} destination ids"
            )
        if self.block_hashes and len(self.block_hashes) != len(self.src_ids):
            raise ValueError(f"job {self.job_id}: block_hashes must name every block moved")

    @property
    def num_blocks(self) -> int:
        return len(self.src_ids)


@dataclass(frozen=True, slots=True)
class JobResult:
    """How one ``TransferJob`` ended on one rank; a handler returns each job's result once.

    Args:
        job_id: the ``TransferJob.job_id`` it reports on.
        ok: True when every block of the job arrived and was verified.
        num_bytes: bytes the job moved (0 when it failed).
        error: why it failed, for logs and the leader; ``None`` when ``ok``.
        bad_block_hashes: blocks found corrupt on read (a slot header or checksum that did not
            match, or the worker's own record of the slot); the leader drops them from the
            tier's index.
        finished_at: ``time.monotonic()`` when the job finished (the latency metrics use it).
    """

    job_id: int
    ok: bool
    num_bytes: int = 0
    error: str | None = None
    bad_block_hashes: tuple[int, ...] = ()
    finished_at: float = field(default_factory=time.monotonic)


class Storage(ABC):
    """One rank's share of a tier: ``num_slots`` block slots laid out per ``layout``."""

    medium: str
    layout: KvLayout
    num_slots: int
    #: True when the storage itself checks, on every read, that a slot holds the block hash the
    #: job names (the disk tier's slot headers); otherwise the worker keeps its own record of
    #: what it wrote into each slot and checks reads against that.
    verifies_block_hashes: bool = False

    def host_view(self) -> np.ndarray | None:
        """A ``[num_slots, bytes_per_block]`` uint8 view when the bytes are host-addressable."""
        return None

    def persisted_blocks(self) -> Mapping[int, int] | None:
        """``{hash: slot}`` a persistent tier found from before a restart; ``None`` when the
        storage keeps nothing across restarts (the disk tier's ``DiskStorage`` overrides it)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the storage; idempotent."""


class DevicePool(Storage):
    """The engine's GPU KV pool, as registered by ``register_kv_caches``.

    ``tensors`` holds one tensor ``[num_blocks, layers, kv, ...]`` for a fully contiguous
    layout, or one tensor per layer ``[num_blocks, kv, ...]`` for a layer-separate one.
    """

    medium = GPU

    def __init__(self, tensors: Sequence[Any], layout: KvLayout) -> None:
        self.tensors = list(tensors)
        self.layout = layout
        self.num_slots = int(self.tensors[0].shape[0])


class TransferHandler(ABC):
    """Moves blocks from ``src_medium`` to ``dst_medium`` asynchronously (see module doc)."""

    src_medium: str
    dst_medium: str

    @abstractmethod
    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        """Start ``jobs`` and return at once, never blocking on I/O.

        Args:
            jobs: jobs whose ``(src, dst)`` is this handler's media pair.
            ready: an opaque fence the jobs wait for before reading their source (on a GPU, a
                CUDA event recorded after the forward pass); ``None``: the source is ready now.

        Returns:
            Nothing; a job that cannot run is reported failed by ``poll``, not raised here.
        """

    @abstractmethod
    def poll(self) -> list[JobResult]:
        """Collect what finished, without waiting.

        Returns:
            The results of the jobs that finished since the last poll, each job exactly once.
        """

    @property
    @abstractmethod
    def num_pending(self) -> int:
        """Jobs submitted whose results ``poll`` has not returned yet.

        Returns:
            That count; 0 means every submitted job has been reported.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Finish or cancel what is in flight; idempotent."""

    def wait(self, timeout: float | None = None) -> list[JobResult]:
        """Poll until nothing is pending (or ``timeout`` seconds pass); for tests and shutdown."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = self.poll()
        while self.num_pending and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.0005)
            results.extend(self.poll())
        return results


class NoHandlerError(LookupError):
    pass


class TransferEngine:
    """A worker's handlers, keyed by ``(src, dst)`` medium pair."""

    def __init__(self, handlers: Iterable[TransferHandler] = ()) -> None:
        self._handlers: dict[tuple[str, str], TransferHandler] = {}
        self._failed: list[JobResult] = []
        for handler in handlers:
            self.register(handler)

    def register(self, handler: TransferHandler) -> None:
        pair = (handler.src_medium, handler.dst_medium)
        if pair in self._handlers:
            raise ValueError(f"two handlers for {pair[0]} -> {pair[1]}")
        self._handlers[pair] = handler

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return set(self._handlers)

    def handler(self, src: str, dst: str) -> TransferHandler:
        try:
            return self._handlers[(src, dst)]
        except KeyError:
            raise NoHandlerError(
                f"no transfer handler for {src} -> {dst}; registered: {sorted(self._handlers)}"
            ) from None

    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        """Route jobs to their handlers; a job with no handler fails rather than raising."""
        by_pair: dict[tuple[str, str], list[TransferJob]] = {}
        for job in jobs:
            by_pair.setdefault((job.src, job.dst), []).append(job)
        for (src, dst), pair_jobs in by_pair.items():
            handler = self._handlers.get((src, dst))
            if handler is None:
                error = f"no transfer handler for {src} -> {dst}"
                self._failed.extend(JobResult(j.job_id, False, error=error) for j in pair_jobs)
                continue
            handler.submit(pair_jobs, ready)

    def poll(self) -> list[JobResult]:
        results, self._failed = self._failed, []
        for handler in self._handlers.values():
            results.extend(handler.poll())
        return results

    @property
    def num_pending(self) -> int:
        return len(self._failed) + sum(h.num_pending for h in self._handlers.values())

    def wait(self, timeout: float | None = None) -> list[JobResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        results = self.poll()
        while self.num_pending and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.0005)
            results.extend(self.poll())
        return results

    def close(self) -> None:
        for handler in self._handlers.values():
            handler.close()
