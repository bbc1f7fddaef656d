"""The block manager: the leader's planner over every tier below the GPU.

Runs in the leader process (TensorRT-LLM's scheduler, rank 0); holds no KV bytes. It turns
the engine's per-request calls into compact, picklable :class:`IterationPlan`s of
:class:`~kvbm_core.transfer.TransferJob`s that every worker executes, and applies the workers'
:class:`~kvbm_core.transfer.JobResult`s back.

Operations, in the order an engine calls them:
- ``lookup(request_id, token_ids, num_computed_tokens, salt)``: the longest contiguous run of
  full blocks after the device's own hit that the tiers hold (block by block, from the first
  tier by level that holds each), pinned for reading. Always leaves at least one prompt
  token to compute. Returns a :class:`Match`.
- ``prepare_load(request_id, block_ids)``: the GPU blocks the match loads into; queues the load
  jobs for the next plan.
- ``schedule(request_id, new_tokens, new_block_ids, computed_position, num_scheduled_tokens)``:
  the request's tokens and blocks so far; queues write-through stores (GPU -> the top tier)
  for every full block this iteration completes, skipping blocks that came from a device or
  tier hit, and their write-back down the tiers below (see below).
- ``build_plan()``: drains what was queued into one :class:`IterationPlan`.
- ``finish(request_id)``: the request ended; True while jobs that touch its GPU blocks are
  pending (the engine must keep the blocks until the workers report them).
- ``apply_results(rank, results)``: a job completes once every rank reported it; a block is
  readable only after every rank wrote it; a failure on any rank rolls the store back or
  drops the loaded blocks, and corrupt blocks leave the index.
- ``cancel(request_id)``: forget a request that never ran (unpins its reads).
- ``take_load_outcomes()``: what became of loads that failed (see below).
- ``fail_late_jobs()``: fail the jobs some rank has not reported within ``job_timeout_secs``
  of being sent (see below); the leader's background tick calls it.

Tiers come top first (by ``TierSpec.level``: host memory, disk, then any plugin's), any
number of them. A block goes down the tiers one at a time: each tier below the top takes the
blocks its admission policy admits (the disk's: sighted twice, stored then hit, so hot
prefixes survive a restart) from the tier above, when its handlers copy from that tier
(``TierSlots.stores_from``), chained behind the job that writes them there (``after_job_id``):
they reach every tier without waiting for another engine call. A tier that cannot copy from
the tier above but can from the GPU is written from the GPU blocks beside the chain; one that
can do neither is skipped. A block a tier did not take goes no further down. A hit in a tier
is another sighting: its admitted blocks are copied down from there.

A failed load never counts as loaded. When a request's load job fails on some rank, its
blocks are looked up again (a corrupt block has left its tier by then); if every block is held
somewhere and the request has not been retried yet, a retry is planned for the ranks that
failed. Otherwise the request's loads end in a :class:`LoadOutcome` naming the first token
whose KV did not arrive: the engine must recompute from there, or fail the request.

A job some rank never reports (a worker that hangs, completions lost in a control-channel
outage longer than its retries) would pin its blocks and hold its request forever. Once
``job_timeout_secs`` pass after it was sent, it fails as if the silent ranks had reported a
failure (counted in ``timed_out_jobs``): a store's blocks leave the index unmatched (not counted
as slot failures: the slot is not to blame), a load's request takes the failed-load path with no
retry (the rank that did not answer would get it), pins are released. A late report of a
timed-out job is ignored like any unknown job. Its slots may hold another block by then, so a
late ok must never make anything matchable: that block becomes matchable only through its own
store, reported by every rank, and each rank checks every read against what it last wrote
there (the worker's slot records, the disk tier's headers), so bytes a late write left behind
are refused, never served.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

from kvbm_core._records import _JobRecord, _Request
from kvbm_core._stores import StorePlanner
from kvbm_core.admission import AdmissionPolicy, AlwaysAdmit
from kvbm_core.events import BlockRemoved, BlockStored, EventSink, KvEvent
from kvbm_core.hashing import block_hashes
from kvbm_core.index import TierIndex
from kvbm_core.metrics import KvbmStats
from kvbm_core.plan import IterationPlan, LoadOutcome, Match, TierSlots
from kvbm_core.presence import PresencePlanner
from kvbm_core.transfer import CPU, DISK, GPU, JobResult, TransferJob

__all__ = ["BlockManager", "IterationPlan", "LoadOutcome", "Match", "TierSlots"]

MAX_LOAD_RETRIES = 1
# The built-in tiers' metrics keep Dynamo's names (host_*, disk_*); other tiers have none yet.
_STAT_NAMES = {"cpu": "host", "disk": "disk"}


class BlockManager(StorePlanner, PresencePlanner):
    def __init__(
        self,
        tiers: Sequence[TierSlots],
        block_size: int,
        num_ranks: int = 1,
        bytes_per_block: int = 0,
        admission: AdmissionPolicy | None = None,
        events: EventSink | None = None,
        stats: KvbmStats | None = None,
        clock=time.monotonic,
        job_timeout_secs: float | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.num_ranks = num_ranks
        self.bytes_per_block = bytes_per_block
        self.indexes = {tier.name: TierIndex(tier.name, tier.num_slots) for tier in tiers}
        self.tiers = list(tiers)
        self.admission: AdmissionPolicy = admission if admission is not None else AlwaysAdmit()
        # The top tier takes every block the GPU computes (write-through).
        self._admission = {
            t.name: t.admission or (AlwaysAdmit() if i == 0 else self.admission)
            for i, t in enumerate(self.tiers)
        }
        self.events = events
        self.stats = stats if stats is not None else KvbmStats()
        self._clock = clock
        self.job_timeout_secs = job_timeout_secs
        self._next_deadline_check = 0.0
        self._requests: dict[int, _Request] = {}
        self._jobs: dict[int, _JobRecord] = {}
        self._queued: list[TransferJob] = []
        self._queued_sync: list[int] = []
        self._job_ids = itertools.count(1)
        self._iterations = itertools.count(0)
        self._pending_events: list[KvEvent] = []
        self._load_outcomes: list[LoadOutcome] = []
        self._failed_loads: list[int] = []

    # ---- lookup and loads ------------------------------------------------------------------

    def lookup(
        self,
        request_id: int,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        salt: int,
        is_sync_load: bool = False,
    ) -> Match:
        self.cancel(request_id)
        request = _Request(request_id, salt, list(token_ids), is_sync_load=is_sync_load)
        request.hashes = block_hashes(request.token_ids, self.block_size, salt)
        self._requests[request_id] = request
        num_prompt = len(request.token_ids)
        first_block, misaligned = divmod(num_computed_tokens, self.block_size)
        request.num_skip_blocks = request.num_planned_blocks = min(first_block, len(request.hashes))
        if misaligned or num_computed_tokens >= num_prompt:
            # A device hit ending inside a block (partial reuse) cannot continue a block chain.
            return Match()
        # Leave at least one prompt token to compute: never load the block holding the last token.
        last_loadable = min(len(request.hashes), (num_prompt - 1) // self.block_size)
        self._learn_presence(request.hashes[first_block:last_loadable])
        sources = self._match(request.hashes[first_block:last_loadable])
        hits: dict[str, list[int]] = {}
        for index, group in itertools.groupby(sources, key=lambda s: s[0]):
            hashes = [h for _, h in group]
            slots = index.pin(hashes)
            request.load_sources.extend((index, slot) for slot in slots)
            hits.setdefault(index.name, []).extend(hashes)
        # A hit is another sighting: copies down from there, once every hit is pinned (a copy
        # may evict in a lower tier).
        for name, hashes in hits.items():
            self._store_down(hashes, below=self.indexes[name])
        by_tier = {name: len(hashes) for name, hashes in hits.items()}
        request.first_load_block = first_block
        request.num_skip_blocks = request.num_planned_blocks = first_block + len(sources)
        match = Match(len(sources) * self.block_size, by_tier)
        self.stats.record_lookup(
            num_prompt - num_computed_tokens,
            match.num_host_blocks * self.block_size,
            match.num_disk_blocks * self.block_size,
        )
        self.stats.add("matched_tokens", match.num_tokens)
        return match

    def _match(self, hashes: Sequence[int]) -> list[tuple[TierIndex, int]]:
        sources = []
        for block_hash in hashes:
            index = next((i for i in self.indexes.values() if i.is_readable(block_hash)), None)
            if index is None:
                break
            sources.append((index, block_hash))
        return sources

    def prepare_load(self, request_id: int, block_ids: Sequence[int]) -> list[TransferJob]:
        """Queue the loads of ``lookup``'s match into ``block_ids`` (all of the request's blocks)."""
        request = self._requests.get(request_id)
        if request is None or not request.load_sources:
            return []
        first = request.first_load_block
        num_blocks = len(request.load_sources)
        if len(block_ids) < first + num_blocks:
            self.cancel(request_id)
            raise ValueError(
                f"request {request_id}: {len(block_ids)} GPU blocks allocated, "
                f"{first + num_blocks} needed for the matched prefix"
            )
        request.block_ids = list(block_ids)
        jobs = []
        position = first
        sources = request.load_sources
        for index, group in itertools.groupby(sources, key=lambda s: s[0]):
            slots = tuple(slot for _, slot in group)
            jobs.append(self._load_job(request, index, slots, position))
            position += len(slots)
        request.load_sources = []
        self._queued.extend(jobs)
        if request.is_sync_load and jobs:
            self._queued_sync.append(request_id)
        return jobs

    def _load_job(
        self,
        request: _Request,
        index: TierIndex,
        slots: tuple[int, ...],
        first_block: int,
        ranks: Iterable[int] | None = None,
    ) -> TransferJob:
        end = first_block + len(slots)
        job = TransferJob(
            next(self._job_ids), index.name, GPU, slots,
            tuple(request.block_ids[first_block:end]), tuple(request.hashes[first_block:end]),
            request_id=request.request_id,
        )
        self._record(job, request, src_index=index, src_slots=slots, ranks=ranks)
        self._jobs[job.job_id].first_block = first_block
        request.num_pending_loads += 1
        return job

    # ---- plans and results -----------------------------------------------------------------

    def build_plan(self) -> IterationPlan:
        jobs, self._queued = tuple(self._queued), []
        sync_ids, self._queued_sync = tuple(self._queued_sync), []
        load_ids: dict[int, list[int]] = {}
        gpu_ids: dict[int, list[int]] = {}
        for job in jobs:
            self._set_deadline(self._jobs[job.job_id])
            request_id = job.request_id
            if request_id is None:
                continue
            gpu_ids.setdefault(request_id, []).append(job.job_id)
            if job.dst == GPU:
                load_ids.setdefault(request_id, []).append(job.job_id)
        failed_ids, self._failed_loads = tuple(self._failed_loads), []
        self._flush_events()
        return IterationPlan(
            next(self._iterations),
            jobs,
            {r: tuple(j) for r, j in load_ids.items()},
            {r: tuple(j) for r, j in gpu_ids.items()},
            sync_ids,
            failed_ids,
        )

    def apply_results(self, rank: int, results: Iterable[JobResult]) -> None:
        for result in results:
            record = self._jobs.get(result.job_id)
            if record is None or rank not in record.remaining_ranks:
                continue  # unknown or duplicate report: nothing to apply twice
            record.remaining_ranks.discard(rank)
            record.num_bytes += result.num_bytes
            if not result.ok:
                record.ok = False
                record.errors.append(f"rank {rank}: {result.error}")
                record.bad_hashes.update(result.bad_block_hashes)
                record.failed_ranks.add(rank)
            if not record.remaining_ranks:
                self._complete(record)
        self._flush_events()

    def _complete(self, record: _JobRecord) -> None:
        del self._jobs[record.job.job_id]
        job = record.job
        if record.src_index is not None:
            record.src_index.unpin(record.src_slots)
        if record.bad_hashes and record.src_index is not None:
            removed = record.src_index.remove(record.bad_hashes)
            self.stats.add("corrupt_blocks", len(removed))
            self._note_evicted(record.src_index, removed, evicted=False)
        if record.dst_index is not None and record.is_timed_out:
            record.dst_index.remove(job.block_hashes)
        elif record.dst_index is not None:
            record.dst_index.complete_store(job.block_hashes, record.ok)
        if not record.ok:
            self.stats.add("failed_transfers")
        else:
            self._count_transfer(job, record)
        if record.ok and record.dst_index is not None:
            self._on_stored(record)
        if record.request_id is not None:
            request = self._requests.get(record.request_id)
            if request is not None:
                request.pending_job_ids.discard(job.job_id)
                if job.dst == GPU:
                    self._on_load_done(request, record)
                if request.is_finished and not request.pending_job_ids:
                    del self._requests[record.request_id]

    def _on_load_done(self, request: _Request, record: _JobRecord) -> None:
        request.num_pending_loads -= 1
        if not record.ok:
            self.stats.add("failed_loads")
            if request.is_sync_load:
                return  # the worker failed that very forward step: nothing left to decide
            is_final = request.is_finished or record.is_timed_out
            retry = None if is_final else self._plan_retry(request, record)
            if retry is not None:
                self._load_outcomes.append(retry)
                return
            first = record.first_block
            if request.load_failed_at_block is None or first < request.load_failed_at_block:
                request.load_failed_at_block = first
        if request.num_pending_loads == 0 and request.load_failed_at_block is not None:
            first, request.load_failed_at_block = request.load_failed_at_block, None
            if not request.is_finished:
                self.stats.add("recomputed_load_tokens", (request.num_skip_blocks - first) * self.block_size)
                self._load_outcomes.append(
                    LoadOutcome(request.request_id, recompute_from_token=first * self.block_size)
                )

    def _plan_retry(self, request: _Request, record: _JobRecord) -> LoadOutcome | None:
        """Load the failed job's blocks again, from wherever they are held now."""
        if request.num_load_retries >= MAX_LOAD_RETRIES:
            return None
        hashes = record.job.block_hashes
        sources = self._match(hashes)
        if len(sources) != len(hashes):
            return None
        request.num_load_retries += 1
        jobs = []
        position = record.first_block
        ranks = sorted(record.failed_ranks)
        for index, group in itertools.groupby(sources, key=lambda s: s[0]):
            slots = tuple(index.pin([h for _, h in group]))
            jobs.append(self._load_job(request, index, slots, position, ranks=ranks))
            position += len(slots)
        for job in jobs:  # sent at once, in a LoadRecovery rather than a plan
            self._set_deadline(self._jobs[job.job_id])
        self.stats.add("retried_loads")
        return LoadOutcome(request.request_id, tuple(jobs), tuple(ranks))

    def _set_deadline(self, record: _JobRecord) -> None:
        if self.job_timeout_secs is not None:
            record.deadline = self._clock() + self.job_timeout_secs

    def fail_late_jobs(self) -> list[int]:
        """Fail every sent job not reported by all ranks by its deadline; their ids."""
        now = self._clock()
        if self.job_timeout_secs is None or now < self._next_deadline_check:
            return []
        # Called every few milliseconds: a scan of every job a few times a second is enough.
        self._next_deadline_check = now + min(1.0, self.job_timeout_secs / 8)
        late = [r for r in self._jobs.values() if r.deadline is not None and r.deadline <= now]
        for record in late:
            silent = sorted(record.remaining_ranks)
            record.ok, record.is_timed_out = False, True
            record.errors.append(f"rank(s) {silent}: no report within {self.job_timeout_secs:g} s")
            record.failed_ranks.update(silent)
            record.remaining_ranks.clear()
            self._complete(record)
        if late:
            self.stats.add("timed_out_jobs", len(late))
            self._flush_events()
        return [record.job.job_id for record in late]

    def take_load_outcomes(self) -> list[LoadOutcome]:
        """What became of failed loads since the last call (see the module docstring)."""
        outcomes, self._load_outcomes = self._load_outcomes, []
        return outcomes

    def fail_loads(self, request_ids: Iterable[int]) -> None:
        """Have every rank fail these requests in the next plan (their KV will not arrive)."""
        self._failed_loads.extend(request_ids)

    def _count_transfer(self, job: TransferJob, record: _JobRecord) -> None:
        direction = {
            (GPU, CPU): "offload_{}_d2h",
            (CPU, DISK): "offload_{}_h2d",
            (GPU, DISK): "offload_{}_d2d",
            (CPU, GPU): "onboard_{}_h2d",
            (DISK, GPU): "onboard_{}_d2d",
        }.get((job.src, job.dst))
        if direction is None:
            return
        self.stats.add(direction.format("blocks"), job.num_blocks)
        self.stats.add(direction.format("bytes"), record.num_bytes)
        kind = "onboard_latency_seconds" if job.dst == GPU else "offload_latency_seconds"
        self.stats.observe(kind, self._clock() - record.planned_at)

    def _on_stored(self, record: _JobRecord) -> None:
        job = record.job
        medium = job.dst
        if record.token_blocks and self.events is not None:
            self._pending_events.append(
                BlockStored(
                    medium, job.block_hashes, record.parent_hash,
                    tuple(t for block in record.token_blocks for t in block), self.block_size,
                )
            )
        elif self.events is not None:
            self._pending_events.append(BlockStored(medium, job.block_hashes, None, (), self.block_size))

    def _note_evicted(self, index: TierIndex, hashes: Sequence[int], evicted: bool = True) -> None:
        if not hashes or (evicted and self._is_shared(index.name)):
            return  # a shared tier's index forgets an entry; the block stays in the store
        name = _STAT_NAMES.get(index.name)
        if evicted and name is not None:
            self.stats.add(f"evicted_blocks_{name}", len(hashes))
        if self.events is not None:
            self._pending_events.append(BlockRemoved(index.name, tuple(hashes)))

    def _flush_events(self) -> None:
        if self._pending_events and self.events is not None:
            events, self._pending_events = self._pending_events, []
            self.events.publish(events)
        self._update_occupancy()

    def _update_occupancy(self) -> None:
        for name, prefix in _STAT_NAMES.items():
            index = self.indexes.get(name)
            if index is not None:
                self.stats.set(f"{prefix}_cache_used_blocks", index.num_used)
                self.stats.set(f"{prefix}_cache_capacity_blocks", index.num_slots)
                self.stats.set(f"{prefix}_cache_retired_blocks", len(index.retired_slots))

    def _record(
        self,
        job: TransferJob,
        request: _Request | None,
        src_index: TierIndex | None = None,
        src_slots: tuple[int, ...] = (),
        dst_index: TierIndex | None = None,
        token_blocks: tuple[tuple[int, ...], ...] = (),
        parent_hash: int | None = None,
        ranks: Iterable[int] | None = None,
    ) -> None:
        self._jobs[job.job_id] = _JobRecord(
            job,
            request.request_id if request is not None else None,
            src_index,
            src_slots,
            dst_index,
            token_blocks,
            parent_hash,
            set(range(self.num_ranks)) if ranks is None else set(ranks),
            self._clock(),
        )
        if request is not None:
            request.pending_job_ids.add(job.job_id)

    # ---- request lifetime ------------------------------------------------------------------

    def finish(self, request_id: int) -> bool:
        """The request ended. True while jobs touching its GPU blocks are still pending."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._unpin_unplanned(request)
        if request.pending_job_ids:
            request.is_finished = True
            return True
        del self._requests[request_id]
        return False

    def cancel(self, request_id: int) -> None:
        """Forget a request whose loads were never planned; jobs already planned still complete."""
        self.finish(request_id)

    def _unpin_unplanned(self, request: _Request) -> None:
        for index, group in itertools.groupby(request.load_sources, key=lambda s: s[0]):
            index.unpin([slot for _, slot in group])
        request.load_sources = []

    def is_pending(self, request_id: int) -> bool:
        request = self._requests.get(request_id)
        return request is not None and bool(request.pending_job_ids)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    @property
    def num_pending_jobs(self) -> int:
        return len(self._jobs)

    def restore(self, tier_name: str, blocks: dict[int, int]) -> None:
        """Seed a persistent tier's index with ``{hash: slot}`` its workers found on disk."""
        self.indexes[tier_name].restore(blocks)
        self._update_occupancy()
