"""The transfer protocol: jobs, results, and TransferEngine's routing by medium pair.

The handlers here are real, small synchronous handlers over numpy arrays (host memory stands
in for every medium), so the engine is exercised end to end without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from kvbm_core.layout import KvLayout
from kvbm_core.transfer import (
    CPU,
    DISK,
    GPU,
    DevicePool,
    JobResult,
    NoHandlerError,
    Storage,
    TransferEngine,
    TransferHandler,
    TransferJob,
)

LAYOUT = KvLayout(num_layers=2, tokens_per_block=4, num_kv_heads=1, head_dim=4, dtype="uint8")


class ArrayStorage(Storage):
    def __init__(self, medium: str, num_slots: int) -> None:
        self.medium, self.layout, self.num_slots = medium, LAYOUT, num_slots
        self.rows = np.zeros((num_slots, LAYOUT.bytes_per_block), dtype=np.uint8)

    def host_view(self) -> np.ndarray:
        return self.rows


class CopyHandler(TransferHandler):
    """Copies at submit time and reports at the next poll; records what it was given."""

    def __init__(self, src: ArrayStorage, dst: ArrayStorage) -> None:
        self.src_medium, self.dst_medium = src.medium, dst.medium
        self.src, self.dst = src, dst
        self.done: list[JobResult] = []
        self.readies: list[Any] = []
        self.num_closes = 0

    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        self.readies.append(ready)
        for job in jobs:
            self.dst.rows[list(job.dst_ids)] = self.src.rows[list(job.src_ids)]
            self.done.append(
                JobResult(job.job_id, True, num_bytes=job.num_blocks * LAYOUT.bytes_per_block)
            )

    def poll(self) -> list[JobResult]:
        done, self.done = self.done, []
        return done

    @property
    def num_pending(self) -> int:
        return len(self.done)

    def close(self) -> None:
        self.num_closes += 1


@pytest.fixture
def media() -> dict[str, ArrayStorage]:
    return {m: ArrayStorage(m, 16) for m in (GPU, CPU, DISK)}


def test_job_ids_must_pair_up() -> None:
    with pytest.raises(ValueError, match="job 3: 2 source ids for 1 destination ids"):
        TransferJob(3, GPU, CPU, (1, 2), (5,))
    with pytest.raises(ValueError, match="block_hashes must name every block"):
        TransferJob(4, GPU, CPU, (1, 2), (5, 6), block_hashes=(9,))
    assert TransferJob(5, GPU, CPU, (1, 2), (5, 6), (7, 8)).num_blocks == 2


def test_results_carry_a_completion_time() -> None:
    first, second = JobResult(1, True), JobResult(2, False, error="x")
    assert second.finished_at >= first.finished_at and second.error == "x"


def test_device_pool_counts_blocks_of_its_first_tensor() -> None:
    pool = DevicePool([np.zeros((7, 2, 2, 16)), np.zeros((7, 2, 16))], LAYOUT)
    assert pool.medium == GPU and pool.num_slots == 7 and pool.host_view() is None
    pool.close()


def test_engine_routes_each_job_to_its_pair(media: dict[str, ArrayStorage]) -> None:
    store, load = CopyHandler(media[GPU], media[CPU]), CopyHandler(media[CPU], media[GPU])
    engine = TransferEngine([store, load])
    assert engine.pairs == {(GPU, CPU), (CPU, GPU)}
    assert engine.handler(CPU, GPU) is load
    media[GPU].rows[3] = 7
    engine.submit([TransferJob(1, GPU, CPU, (3,), (9,))], ready="fence")
    engine.submit([TransferJob(2, CPU, GPU, (9,), (4,))])
    results = engine.wait(timeout=5)
    assert sorted((r.job_id, r.ok) for r in results) == [(1, True), (2, True)]
    assert (media[GPU].rows[4] == 7).all()
    assert store.readies == ["fence"] and load.readies == [None]
    assert engine.num_pending == 0


def test_a_second_handler_for_a_pair_is_refused(media: dict[str, ArrayStorage]) -> None:
    engine = TransferEngine([CopyHandler(media[GPU], media[CPU])])
    with pytest.raises(ValueError, match="two handlers for gpu -> cpu"):
        engine.register(CopyHandler(media[GPU], media[CPU]))


def test_a_job_with_no_handler_fails_as_a_result(media: dict[str, ArrayStorage]) -> None:
    engine = TransferEngine([CopyHandler(media[GPU], media[CPU])])
    engine.submit([TransferJob(1, GPU, DISK, (0,), (0,)), TransferJob(2, GPU, CPU, (0,), (1,))])
    assert engine.num_pending == 2
    results = {r.job_id: r for r in engine.poll()}
    assert results[2].ok
    assert not results[1].ok and results[1].error == "no transfer handler for gpu -> disk"
    assert engine.num_pending == 0 and engine.poll() == []


def test_looking_up_a_missing_pair_names_the_registered_ones(
    media: dict[str, ArrayStorage],
) -> None:
    engine = TransferEngine([CopyHandler(media[GPU], media[CPU])])
    with pytest.raises(
        NoHandlerError,
        match=r"no transfer handler for disk -> gpu; registered: \[\('gpu', 'cpu'\)\]",
    ):
        engine.handler(DISK, GPU)


def test_close_reaches_every_handler(media: dict[str, ArrayStorage]) -> None:
    handlers = [CopyHandler(media[GPU], media[CPU]), CopyHandler(media[CPU], media[DISK])]
    TransferEngine(handlers).close()
    assert [h.num_closes for h in handlers] == [1, 1]


class NeverDone(CopyHandler):
    def poll(self) -> list[JobResult]:
        return []

    @property
    def num_pending(self) -> int:
        return 1


def test_wait_gives_up_after_its_timeout(media: dict[str, ArrayStorage]) -> None:
    handler = NeverDone(media[GPU], media[CPU])
    assert handler.wait(timeout=0.01) == []
    assert TransferEngine([handler]).wait(timeout=0.01) == []
