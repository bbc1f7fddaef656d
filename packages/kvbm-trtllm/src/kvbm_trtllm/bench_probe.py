"""``kvbm bench``'s transfer probe: the rate one job gets from each tier on an idle engine.

Which process: the ``kvbm`` command (or a test), after a TP=1 kvbm run, while its worker still
runs. ``probe_transfers(worker, with_disk=...)`` times one job of up to ``max_blocks`` blocks
per direction through the worker's own handlers (:meth:`KvbmWorkerCore.probe_transfer
<kvbm_runtime.worker.KvbmWorkerCore.probe_transfer>`): best of ``repeats``, wall clock from
submit to the last result, so it is the rate a job gets from the tier (the planner's latency
histograms also count the wait for the forward pass). It overwrites the first slots of each
tier; a direction that fails is reported with ``"error"``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbm_runtime.worker import KvbmWorkerCore

__all__ = ["probe_transfers", "PROBE_JOB_ID"]

PROBE_JOB_ID = 1 << 48  # far above the planner's job ids
# Writes first, so the reads that follow find blocks written under the hashes they name.
_PROBE_ORDER = (("gpu", "cpu"), ("cpu", "disk"), ("gpu", "disk"), ("cpu", "gpu"), ("disk", "gpu"),
                ("disk", "cpu"))


def probe_transfers(
    worker: KvbmWorkerCore, *, with_disk: bool, max_blocks: int = 64, repeats: int = 3,
) -> dict[str, dict[str, float | str]]:
    """``"src->dst"`` -> blocks, bytes and ``seconds``/``gb_per_s`` (or ``error``) per direction."""
    rates: dict[str, dict[str, float | str]] = {}
    job_ids = itertools.count(PROBE_JOB_ID)
    block_hashes = tuple(range(PROBE_JOB_ID, PROBE_JOB_ID + max_blocks))
    for src, dst in _PROBE_ORDER:
        if not with_disk and "disk" in (src, dst):
            continue
        rate = _probe(worker, src, dst, block_hashes, job_ids, repeats)
        if rate is not None:
            rates[f"{src}->{dst}"] = rate
    return rates


def _probe(
    worker: KvbmWorkerCore, src: str, dst: str, block_hashes: Sequence[int],
    job_ids: Iterator[int], repeats: int,
) -> dict[str, float | str] | None:
    best = math.inf
    sizes: dict[str, float | str] | None = None
    for _ in range(repeats):
        probe = worker.probe_transfer(src, dst, block_hashes, next(job_ids))
        if probe is None:
            return None
        sizes = {"blocks": probe.num_blocks, "bytes": probe.num_bytes}
        failed = [r for r in probe.results if not r.ok]
        if failed or not probe.results:
            error = failed[0].error if failed else "no result within 60 s"
            if error is not None:
                return {**sizes, "error": error}
            break
        best = min(best, probe.seconds)
    if sizes is None:
        return None
    return {**sizes, "seconds": best, "gb_per_s": float(sizes["bytes"]) / best / 1e9}
