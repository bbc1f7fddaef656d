"""The block manager's store planning: write-through from the GPU and write-back down the
tiers (see :mod:`kvbm_core.manager`'s docstring for the rules). A base of
:class:`~kvbm_core.manager.BlockManager`, kept apart so each module holds one concept.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvbm_core._records import _Request
from kvbm_core.hashing import block_hashes
from kvbm_core.index import TierIndex
from kvbm_core.plan import TierSlots
from kvbm_core.transfer import GPU, TransferJob

if TYPE_CHECKING:
    from kvbm_core.admission import AdmissionPolicy
    from kvbm_core.events import EventSink
    from kvbm_core.metrics import KvbmStats


class StorePlanner:
    block_size: int
    tiers: list[TierSlots]
    indexes: dict[str, TierIndex]
    events: EventSink | None
    stats: KvbmStats
    _admission: dict[str, AdmissionPolicy]
    _requests: dict[int, _Request]
    _queued: list[TransferJob]
    _job_ids: itertools.count[int]

    # The manager's own bookkeeping, which the store plans feed.
    _record: Callable[..., None]
    _note_evicted: Callable[..., None]

    # ---- stores ----------------------------------------------------------------------------

    def schedule(
        self,
        request_id: int,
        new_tokens: Sequence[int],
        new_block_ids: Sequence[int],
        computed_position: int,
        num_scheduled_tokens: int,
        is_new: bool = False,
        salt: int | None = None,
    ) -> None:
        """Record a scheduled request's deltas and queue stores for blocks it completes.

        ``is_new`` marks the request's first report, which carries its whole prompt and every
        block allocated for it (the lookup already saw the prompt). ``salt`` is needed only
        for a request ``lookup`` never saw; without one such a request is not stored.
        """
        request = self._requests.get(request_id)
        if request is None:
            if salt is None:
                return  # its identity is unknown: storing it could serve it to another tenant
            # A request kvbm never looked up (e.g. block reuse off): track it from here.
            request = _Request(request_id, salt, [])
            self._requests[request_id] = request
        if is_new:
            request.token_ids = list(new_tokens)
            request.block_ids = list(new_block_ids)
        else:
            if new_tokens:
                request.token_ids.extend(new_tokens)
            if new_block_ids:
                request.block_ids.extend(new_block_ids)
        if is_new:
            # On a sync load's first appearance the engine reports computed_position without the
            # tokens kvbm loads in this very iteration; they are done all the same.
            computed_position = max(computed_position, request.num_skip_blocks * self.block_size)
        num_done = computed_position + num_scheduled_tokens
        if num_done < (request.num_planned_blocks + 1) * self.block_size:
            return  # the common decode step: no block completes
        num_done = min(num_done, len(request.token_ids))
        num_complete = min(num_done // self.block_size, len(request.block_ids))
        if num_complete <= request.num_planned_blocks:
            return
        self._extend_hashes(request, num_complete)
        first = request.num_planned_blocks
        request.num_planned_blocks = num_complete
        if first < request.num_skip_blocks:
            first = request.num_skip_blocks
        if first < num_complete:
            self._queue_gpu_store(request, first, num_complete)

    def _extend_hashes(self, request: _Request, num_blocks: int) -> None:
        have = len(request.hashes)
        if have >= num_blocks:
            return
        parent = request.hashes[-1] if have else None
        tokens = request.token_ids[have * self.block_size : num_blocks * self.block_size]
        request.hashes.extend(block_hashes(tokens, self.block_size, request.salt, parent))

    def _queue_gpu_store(self, request: _Request, first: int, end: int) -> None:
        positions = {h: first + i for i, h in enumerate(request.hashes[first:end])}
        self._store_down(list(positions), request=request, positions=positions)

    def _store_down(
        self,
        hashes: Sequence[int],
        below: TierIndex | None = None,
        request: _Request | None = None,
        positions: dict[int, int] | None = None,
    ) -> None:
        """Walk the tiers below ``below`` (the GPU when ``None``: ``request``'s blocks at
        ``positions``), planning each tier's copy of what it admits (see the module doc)."""
        source, after = below, None
        first = 0 if below is None else self.tiers.index(self._tier(below)) + 1
        for tier in self.tiers[first:]:
            src = GPU if source is None else source.name
            if src not in tier.stores_from:
                if positions is None or GPU not in tier.stores_from:
                    continue  # nothing can copy into this tier from here
                source, after = None, None  # from the GPU blocks, beside the chain
            index, policy = self.indexes[tier.name], self._admission[tier.name]
            wanted = [h for h in hashes if h not in index and policy.should_admit(h)]
            job = self._copy(wanted, source, index, after, request, positions)
            if job is None:
                return  # what a tier did not take goes no further down
            source, after, hashes = index, job, job.block_hashes

    def _copy(
        self,
        hashes: Sequence[int],
        source: TierIndex | None,
        index: TierIndex,
        after: TransferJob | None,
        request: _Request | None,
        positions: dict[int, int] | None,
    ) -> TransferJob | None:
        """Plan ``hashes`` into ``index`` from ``source`` (the GPU when ``None``)."""
        if source is not None and after is None:
            hashes = [h for h in hashes if source.is_readable(h)]
        allocation = index.prepare_store(hashes) if hashes else None
        if source is None:
            skipped = hashes if allocation is None else allocation.skipped_hashes
            self.stats.add("store_skipped_full", len(skipped))
        if allocation is None:
            return None
        self._note_evicted(index, allocation.evicted_hashes)
        if not allocation.block_hashes:
            return None
        if source is None:
            assert request is not None and positions is not None
            job = self._gpu_store(request, [positions[h] for h in allocation.block_hashes], allocation.slots, index)
        else:
            slots = tuple(source.pin(allocation.block_hashes, allow_pending=after is not None))
            job = TransferJob(
                next(self._job_ids), source.name, index.name, slots, allocation.slots,
                allocation.block_hashes, after_job_id=None if after is None else after.job_id,
            )
            self._record(job, None, src_index=source, src_slots=slots, dst_index=index)
        self._queued.append(job)
        return job

    def _gpu_store(
        self, request: _Request, blocks: list[int], slots: tuple[int, ...], index: TierIndex
    ) -> TransferJob:
        job = TransferJob(
            next(self._job_ids), GPU, index.name, tuple(request.block_ids[b] for b in blocks),
            slots, tuple(request.hashes[b] for b in blocks), request_id=request.request_id,
        )
        token_blocks: tuple[tuple[int, ...], ...] = ()
        parent = None
        if self.events is not None:  # tokens are kept only to publish them
            size = self.block_size
            token_blocks = tuple(tuple(request.token_ids[b * size : (b + 1) * size]) for b in blocks)
            parent = request.hashes[blocks[0] - 1] if blocks[0] else None
        self._record(job, request, dst_index=index, token_blocks=token_blocks, parent_hash=parent)
        return job

    def _tier(self, index: TierIndex) -> TierSlots:
        return next(t for t in self.tiers if t.name == index.name)
