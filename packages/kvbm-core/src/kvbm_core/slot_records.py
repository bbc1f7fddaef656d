"""What a worker wrote into each slot of a tier, so that it delivers only blocks it verified.

Runs in each worker process (one per GPU rank), beside the transfer engine. The leader's plan
says which block a slot holds, but the plan may be wrong (a bug, a stale restore, a forged
control message): the worker trusts its own record, never the plan.

Operations:
- ``SlotRecords(num_slots)``: every slot starts unknown (nothing after a restart: a tier that
  keeps blocks across restarts must verify them itself, ``Storage.verifies_block_hashes``).
- ``prepare_write(job)``: a job writing these slots was submitted; they are unknown until it
  completes, so a half-written slot never verifies.
- ``complete_write(job, ok)``: the job finished on this rank; on success each destination slot
  now holds the block the job named.
- ``mismatches(job) -> list[int]``: the block hashes of the job's source slots that do not hold
  the block the job names (empty when all verify). A job without ``block_hashes`` cannot be
  verified: every block counts as a mismatch.
"""

from __future__ import annotations

import numpy as np

from kvbm_core.transfer import TransferJob

__all__ = ["SlotRecords"]


class SlotRecords:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._hashes = np.zeros(num_slots, dtype=np.uint64)
        self._is_known = np.zeros(num_slots, dtype=bool)

    def prepare_write(self, job: TransferJob) -> None:
        slots = self._valid(job.dst_ids)
        self._is_known[slots] = False

    def complete_write(self, job: TransferJob, ok: bool) -> None:
        if not ok or not job.block_hashes:
            return
        for slot, block_hash in zip(job.dst_ids, job.block_hashes, strict=True):
            if 0 <= slot < self.num_slots:
                self._hashes[slot] = block_hash
                self._is_known[slot] = True

    def mismatches(self, job: TransferJob) -> list[int]:
        if not job.block_hashes:
            return [0] * job.num_blocks
        bad = []
        for slot, block_hash in zip(job.src_ids, job.block_hashes, strict=True):
            if not (
                0 <= slot < self.num_slots
                and self._is_known[slot]
                and int(self._hashes[slot]) == block_hash
            ):
                bad.append(block_hash)
        return bad

    def _valid(self, slots: tuple[int, ...]) -> list[int]:
        return [s for s in slots if 0 <= s < self.num_slots]
