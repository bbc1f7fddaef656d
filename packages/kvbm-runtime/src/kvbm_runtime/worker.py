"""The worker side of the connector: one per GPU rank, the data plane.

Runs in every rank's process (inside the engine adapter's worker half, e.g. TensorRT-LLM's
``KvCacheConnectorWorker``).

Operations:
- ``register_kv_caches(tensors)``: wrap the engine's GPU pool, announce this rank's layout,
  wait for the leader's tier sizes (bounded by ``LEADER_WORKER_INIT_TIMEOUT_SECS``), build
  every configured tier's storage and handlers through the plugins.
- ``report_persisted_blocks()``: send the leader the blocks persistent tiers still hold from
  before a restart, in acknowledged parts of any size (:mod:`kvbm_discovery.restore_sender`).
- ``start_iteration(plan)``: start the plan's jobs that need no forward pass (loads, host ->
  disk); loads of requests the engine runs this very iteration (sync loads) are waited for.
- ``after_forward(ready)``: start the jobs that read GPU blocks, ordered after ``ready`` (a CUDA
  event recorded on the forward stream; ``None`` on a CPU engine). Never syncs the host.
- ``get_finished(saving_ids, loading_ids)``: poll the handlers, send results to the leader, and
  return the request ids whose jobs all finished on this rank (each id once, only ids given).
- ``forward_error()``: why this iteration's forward pass must not run (a load it needs failed),
  or ``None``; the connector raises it inside the engine's forward step.
- ``take_load_errors()``: GPU block ids whose load failed, for engines that have that API.
- ``probe_transfer(src, dst, block_hashes, job_id)``: one timed job on the idle engine, for
  ``kvbm bench``'s transfer rates (a :class:`TransferProbe`).

Trust: the worker delivers only blocks whose identity it verified itself. Every job reading a
tier names the block hash of each slot; a tier that checks slots itself (the disk tier's
headers) verifies it on read, for the others the worker checks its own record of what it wrote
there (:class:`~kvbm_core.slot_records.SlotRecords`) before submitting the job. A mismatch fails
the job (the block is named corrupt, so the leader drops it) and counts ``verify_failures``.

A load that failed on this rank is never reported loaded until the leader decides: it sends
retry jobs or, once the engine was told to recompute what did not arrive, an empty
``LoadRecovery``; or the plan lists the request in ``failed_load_request_ids`` and every rank
fails it together (through the load-error API where the engine has it, else by failing the
forward step). A decision that does not come within the init timeout is an error.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvbm_core.config import KvbmConfig
from kvbm_core.layout import KvLayout
from kvbm_core.manager import IterationPlan
from kvbm_core.messages import Completions, LoadRecovery, TierSizes
from kvbm_core.plugins import TierContext, load_tier_specs, shared_plugin_manager
from kvbm_core.slot_records import SlotRecords
from kvbm_core.tier_options import read_tier_options
from kvbm_core.transfer import GPU, DevicePool, JobResult, Storage, TransferEngine, TransferJob
from kvbm_discovery.discovery import WORKER, InstanceInfo, Registration
from kvbm_runtime.services import RuntimeServices

log = logging.getLogger("kvbm.worker")

__all__ = ["KvbmWorkerCore", "WorkerSetup", "TransferProbe"]

_POLL_SECS = 0.01


@dataclass(frozen=True)
class WorkerSetup:
    rank: int
    world_size: int
    tokens_per_block: int
    head_dim: int | None = None
    device: str = "cpu"
    model_id: str | None = None


@dataclass(frozen=True)
class TransferProbe:
    """One job timed by ``KvbmWorkerCore.probe_transfer``: what it moved and what came back."""

    num_blocks: int
    num_bytes: int
    seconds: float  # wall clock from submit until the results came back (or the wait ended)
    results: list[JobResult]  # empty when none came back in time


class KvbmWorkerCore:
    def __init__(self, config: KvbmConfig, setup: WorkerSetup, services: RuntimeServices) -> None:
        self.config = config
        self.setup = setup
        self.services = services
        self.inbox = services.control.worker_inbox(setup.rank)
        self.layout: KvLayout | None = None
        self.storages: dict[str, Storage] = {}
        self.records: dict[str, SlotRecords] = {}
        self.engine = TransferEngine()
        self.counters: Counter[str] = Counter()
        self._registration: Registration | None = None
        self._lock = threading.Lock()
        self._jobs: dict[int, TransferJob] = {}
        self._job_request: dict[int, int] = {}
        self._gpu_jobs: dict[int, set[int]] = {}
        self._load_jobs: dict[int, set[int]] = {}
        self._loading: set[int] = set()
        self._saving: set[int] = set()
        self._failed_loads: dict[int, set[int]] = {}
        self._held_since: dict[int, float] = {}
        self._abandoned: set[int] = set()  # failed with the forward step: never reported
        self._load_errors: set[int] = set()
        self._deferred: list[TransferJob] = []
        self._chained: dict[int, list[TransferJob]] = {}
        self._dropped: list[JobResult] = []
        self._forward_error: str | None = None
        self.is_recovery_supported = False
        # Handlers finish jobs only when polled; an idle engine polls nothing, so this thread
        # does (a host -> disk copy then reaches the disk and its index without another call).
        self._io_lock = threading.RLock()
        self._is_closed = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="kvbm-worker-poll", daemon=True)
        self._poller.start()

    @contextlib.contextmanager
    def holding_engine(self) -> Iterator[TransferEngine]:
        """Keep the poller off the engine, so a caller waiting on its own jobs gets their results."""
        with self._io_lock:
            yield self.engine

    def probe_transfer(
        self, src: str, dst: str, block_hashes: Sequence[int], job_id: int, timeout_s: float = 60.0
    ) -> TransferProbe | None:
        """Time one job moving slots ``0..n-1`` of ``src`` into the same slots of ``dst``.

        For benchmarks, while no plan is in flight: it overwrites the first slots of ``dst``
        and records block ``i`` there as ``block_hashes[i]``, so a real load of a block that
        was stored in those slots before is refused. The poller is held off, so the job's
        results come back here.

        Args:
            src: the medium read (``gpu``, ``cpu``, ``disk``).
            dst: the medium written.
            block_hashes: one hash per block; ``n`` is at most its length and both tiers' sizes.
            job_id: an id no plan uses.
            timeout_s: how long to wait for the results.

        Returns:
            ``None`` when no handler moves ``src`` -> ``dst`` or a side has no slots; otherwise
            the job's size, its wall-clock seconds and the results that came back.
        """
        if (src, dst) not in self.engine.pairs or self.layout is None:
            return None
        n = min(len(block_hashes), self.storages[src].num_slots, self.storages[dst].num_slots)
        if n <= 0:
            return None
        ids = tuple(range(n))
        job = TransferJob(job_id, src, dst, ids, ids, tuple(block_hashes[:n]))
        with self.holding_engine() as engine:
            # The probe overwrites real slots: the records must say so, or a later load of a
            # block stored there before would verify against bytes the probe wrote.
            records = self.records.get(dst)
            if records is not None:
                records.prepare_write(job)
            started = time.perf_counter()
            engine.submit([job], None)
            results = engine.wait(timeout=timeout_s)
            seconds = time.perf_counter() - started
            if records is not None:
                records.complete_write(job, bool(results) and all(r.ok for r in results))
        return TransferProbe(n, n * self.layout.bytes_per_block, seconds, results)

    # ---- start-up --------------------------------------------------------------------------

    def register_kv_caches(
        self,
        tensors: Sequence[Any],
        layout: KvLayout,
        pool: Storage | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """``pool``: the GPU storage when it is not ``tensors`` (a V2 ``RegionPool``, whose
        device is ``pool.device``); ``metadata``: more facts announced to the leader."""
        self.layout = layout
        # Tiers pin host memory only for a GPU pool: the device comes from the pool itself.
        device = getattr(pool, "device", None) if pool is not None else getattr(tensors[0], "device", "cpu")
        self.setup = replace(self.setup, device=str(device))
        self.storages[GPU] = pool if pool is not None else DevicePool(tensors, layout)
        info = InstanceInfo(
            role=WORKER,
            rank=self.setup.rank,
            world_size=self.setup.world_size,
            bytes_per_block=layout.bytes_per_block,
            layout=layout,
            metadata={"num_gpu_blocks": str(self.storages[GPU].num_slots), **(metadata or {})},
        )
        self._registration = self.services.discovery.register(info)
        sizes = self._wait_for(TierSizes, "the leader's tier sizes (TierSizes)")
        self._build_tiers(dict(sizes.num_slots))

    def _wait_for(self, kind: type, what: str) -> Any:
        timeout = self.config.leader_worker_init_timeout_secs
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.inbox.get(timeout=min(left, 1.0))
            if isinstance(message, kind):
                return message
            if message is not None:
                log.warning("kvbm worker %d: ignoring %s while waiting for %s",
                            self.setup.rank, type(message).__name__, what)
        raise TimeoutError(
            f"kvbm worker rank {self.setup.rank} waited {timeout:.0f} s for {what}; is the kvbm "
            "leader (rank 0's KvbmConnectorLeader) running in the same namespace "
            f"({self.config.namespace!r})? Raise KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS if it is slow."
        )

    def _build_tiers(self, num_slots: dict[str, int]) -> None:
        assert self.layout is not None
        pm = shared_plugin_manager(self.config.disabled_plugins)
        wanted = [name for name, slots in num_slots.items() if slots > 0]
        specs = load_tier_specs(pm, required=wanted)
        # The tiers key what they persist on the model identity too (the disk fingerprint).
        config = replace(self.config, model_id=self.setup.model_id or self.config.model_id)
        contexts = {}
        for name in wanted:
            spec = specs[name]
            contexts[name] = TierContext(
                layout=self.layout, num_slots=num_slots[name], rank=self.setup.rank,
                world_size=self.setup.world_size, device=self.setup.device, config=config,
                options=read_tier_options(spec.options, config),
            )
            storage = spec.make_storage(contexts[name])
            self.storages[name] = storage
            if not storage.verifies_block_hashes:
                self.records[name] = SlotRecords(storage.num_slots)
        for name in wanted:
            for handler in specs[name].make_handlers(self.storages, contexts[name]):
                self.engine.register(handler)
        log.info("kvbm worker %d: tiers %s, handlers %s", self.setup.rank,
                 {n: num_slots[n] for n in wanted}, sorted(self.engine.pairs))

    def persisted_blocks(self) -> dict[str, Mapping[int, int]]:
        """Blocks persistent tiers found at start, by tier name: ``{hash: slot}`` (the disk
        tier's is array-backed: copying it into a dict costs ~100 bytes per block)."""
        found = {}
        for name, storage in self.storages.items():
            persisted = storage.persisted_blocks()
            if persisted is not None:
                found[name] = persisted
        return found

    def report_persisted_blocks(self) -> None:
        """Tell the leader what persistent tiers hold, in acknowledged parts (bounded wait)."""
        from kvbm_discovery.restore_assembly import DEFAULT_RESTORE_TIMEOUT_SECS
        from kvbm_discovery.restore_sender import send_restore

        for tier, blocks in self.persisted_blocks().items():
            report = send_restore(self.services.control, self.inbox, self.setup.rank, tier, blocks,
                                  DEFAULT_RESTORE_TIMEOUT_SECS)
            if not report.is_complete:
                log.error("kvbm worker %d: the leader acknowledged %d of %d parts of the %s restore "
                          "within %.0f s; its blocks are not served", self.setup.rank, report.num_acked,
                          report.num_chunks, tier, report.seconds)

    # ---- per iteration ---------------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._is_closed.wait(_POLL_SECS):
            try:
                with self._io_lock:
                    if self.engine.num_pending or self._dropped:
                        self._collect(self._poll())
            except Exception:  # the thread must survive anything; the error is visible here
                log.exception("kvbm worker %d: polling transfers failed", self.setup.rank)

    def start_iteration(self, plan: IterationPlan | None) -> None:
        with self._io_lock:
            self._start_iteration(plan)

    def _start_iteration(self, plan: IterationPlan | None) -> None:
        if plan is None:
            return
        if plan.failed_load_request_ids:
            self._fail_loads(plan.failed_load_request_ids)
        if not plan.jobs:
            return
        self._add_jobs(plan.jobs, plan.gpu_job_ids, plan.load_job_ids)
        if plan.sync_request_ids:
            self._wait_for_loads(plan.sync_request_ids)

    def _add_jobs(
        self,
        jobs: Sequence[TransferJob],
        gpu_job_ids: dict[int, tuple[int, ...]],
        load_job_ids: dict[int, tuple[int, ...]],
    ) -> None:
        with self._lock:
            for job in jobs:
                self._jobs[job.job_id] = job
            for request_id, job_ids in gpu_job_ids.items():
                self._gpu_jobs.setdefault(request_id, set()).update(job_ids)
                for job_id in job_ids:
                    self._job_request[job_id] = request_id
            for request_id, job_ids in load_job_ids.items():
                self._load_jobs.setdefault(request_id, set()).update(job_ids)
        for job in jobs:
            records = self.records.get(job.dst)
            if records is not None:
                records.prepare_write(job)  # unknown until written: never verifies half-written
        now = []
        for job in jobs:
            if job.after_job_id is not None:
                self._chained.setdefault(job.after_job_id, []).append(job)
            elif job.src == GPU:
                self._deferred.append(job)
            else:
                now.append(job)
        self._submit(now)

    def _submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        verified = [job for job in jobs if self._verify(job)]
        if verified:
            self.engine.submit(verified, ready)

    def _verify(self, job: TransferJob) -> bool:
        """Whether every source slot holds the block the job names (failing the job if not)."""
        records = self.records.get(job.src)
        if records is not None:
            bad = records.mismatches(job)
        elif job.src != GPU and not job.block_hashes:
            bad = [0] * job.num_blocks  # a self-verifying tier needs the hashes to check
        else:
            return True
        if not bad:
            return True
        self.counters["verify_failures"] += len(bad)
        error = (
            f"{len(bad)} of {job.num_blocks} {job.src} slot(s) do not hold the blocks the plan "
            "names (never written by this rank, or rewritten since); nothing was copied"
        )
        log.warning("kvbm worker %d: job %d refused: %s", self.setup.rank, job.job_id, error)
        self._dropped.append(JobResult(job.job_id, False, error=error, bad_block_hashes=tuple(bad)))
        return False

    def _wait_for_loads(self, request_ids: Iterable[int]) -> None:
        # Sync loads: the engine runs these requests in this iteration's forward pass.
        deadline = time.monotonic() + self.config.leader_worker_init_timeout_secs
        request_ids = list(request_ids)
        while any(self._load_jobs.get(r) for r in request_ids):
            self._collect(self._poll())
            if time.monotonic() > deadline:
                raise TimeoutError(f"kvbm worker {self.setup.rank}: sync loads did not finish")
            time.sleep(0.0002)
        failed = [r for r in request_ids if self._failed_loads.get(r)]
        for request_id in failed:
            self._held_since.pop(request_id, None)  # nothing to decide: the step fails now
            self._failed_loads.pop(request_id, None)
        failed = sorted(set().union(*all_gather(failed))) if self.setup.world_size > 1 else failed
        if failed:
            # Every rank fails the same forward step: the engine must not read KV that a rank
            # lacks, and ranks that disagree on which requests fail would diverge.
            self._forward_error = (
                f"kvbm: synchronous KV loads for request(s) {failed} failed, so this forward "
                "step would read KV that never arrived; the engine fails the batch instead. Set "
                "KVBM_ASYNC_LOAD=1 (the default): asynchronous loads recompute what failed."
            )

    def forward_error(self) -> str | None:
        """Why this iteration's forward step must fail; cleared once taken.

        The step will not finish, so its stores would copy blocks it never wrote: they fail.
        """
        error, self._forward_error = self._forward_error, None
        if error is not None and self._deferred:
            jobs, self._deferred = self._deferred, []
            reason = "not stored: the forward step that was to write these blocks failed"
            self._dropped.extend(JobResult(j.job_id, False, error=reason) for j in jobs)
        return error

    def after_forward(self, ready: Any = None) -> None:
        with self._io_lock:
            jobs, self._deferred = self._deferred, []
            if jobs:
                self._submit(jobs, ready)

    @property
    def has_deferred_jobs(self) -> bool:
        return bool(self._deferred)

    def get_finished(
        self, finished_gen_req_ids: Iterable[int], started_loading_req_ids: Iterable[int]
    ) -> tuple[list[int], list[int]]:
        with self._io_lock:
            self._apply_recoveries()
            self._collect(self._poll())
        with self._lock:
            self._saving.update(finished_gen_req_ids)
            self._loading.update(started_loading_req_ids)
            # A request that ended while loading (cancelled) is reported once, as saved, when
            # the copy into its blocks is done: never a second time as loaded.
            self._loading -= self._saving
            done_saving = [r for r in self._saving if not self._gpu_jobs.get(r)]
            self._loading -= self._abandoned
            self._abandoned.clear()
            done_loading = [
                r for r in self._loading if not self._load_jobs.get(r) and r not in self._held_since
            ]
            for request_id in done_saving:
                self._saving.discard(request_id)
                self._gpu_jobs.pop(request_id, None)
                self._failed_loads.pop(request_id, None)
                self._held_since.pop(request_id, None)
            for request_id in done_loading:
                self._loading.discard(request_id)
                self._load_jobs.pop(request_id, None)
                self._failed_loads.pop(request_id, None)
        self._check_held()
        return done_saving, done_loading

    def _check_held(self) -> None:
        timeout = self.config.leader_worker_init_timeout_secs
        late = [r for r, t in self._held_since.items() if time.monotonic() - t > timeout]
        if late:
            raise TimeoutError(
                f"kvbm worker {self.setup.rank}: loads of request(s) {late} failed and the "
                f"leader decided nothing within {timeout:.0f} s; is rank 0's KvbmConnectorLeader "
                "alive and on the same control channel?"
            )

    def _apply_recoveries(self) -> None:
        for message in self.inbox.poll():
            if not isinstance(message, LoadRecovery):
                log.warning("kvbm worker %d: ignoring %s", self.setup.rank, type(message).__name__)
                continue
            request_id = message.request_id
            if request_id not in self._held_since:
                continue  # a stale or foreign decision: only a failed load waits for one
            del self._held_since[request_id]
            if message.jobs:
                ids = tuple(job.job_id for job in message.jobs)
                self._add_jobs(message.jobs, {request_id: ids}, {request_id: ids})
            else:
                self._failed_loads.pop(request_id, None)  # the engine recomputes it

    def _fail_loads(self, request_ids: Iterable[int]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._held_since.pop(request_id, None)
                blocks = self._failed_loads.pop(request_id, set())
                if self.is_recovery_supported:
                    self._load_errors.update(blocks)
                    continue
                self._abandoned.add(request_id)
                self._forward_error = (
                    f"kvbm: the KV of request {request_id} could not be loaded from any tier and "
                    "this engine can neither recompute nor fail one request, so the forward step "
                    "fails the batch rather than read KV that never arrived"
                )

    def _poll(self) -> list[JobResult]:
        results = self.engine.poll()
        if self._dropped:
            results.extend(self._dropped)
            self._dropped = []
        return results

    def _collect(self, results: list[JobResult]) -> None:
        if not results:
            return
        self.services.control.send_to_leader(Completions(self.setup.rank, tuple(results)))
        released = []
        with self._lock:
            for result in results:
                job = self._jobs.pop(result.job_id, None)
                request_id = self._job_request.pop(result.job_id, None)
                if job is None:
                    continue
                records = self.records.get(job.dst)
                if records is not None:
                    records.complete_write(job, result.ok)
                released.extend(self._release_chained(job, result.ok))
                if not result.ok:
                    log.warning("kvbm worker %d: job %d (%s -> %s, %d blocks) failed: %s",
                                self.setup.rank, job.job_id, job.src, job.dst, job.num_blocks,
                                result.error)
                if request_id is None:
                    continue
                self._gpu_jobs.get(request_id, set()).discard(result.job_id)
                if job.dst == GPU:
                    self._load_jobs.get(request_id, set()).discard(result.job_id)
                    if not result.ok:
                        self._on_failed_load(request_id, job)
        self._submit(released)

    def _release_chained(self, job: TransferJob, ok: bool) -> list[TransferJob]:
        chained = self._chained.pop(job.job_id, [])
        if ok:
            return chained
        error = f"not copied: job {job.job_id}, which writes its source, failed on this rank"
        self._dropped.extend(JobResult(j.job_id, False, error=error) for j in chained)
        return []

    def _on_failed_load(self, request_id: int, job: TransferJob) -> None:
        # The engine recomputes from the failed block (or fails the request), so this
        # iteration's forward pass will not write the blocks its stores were planned for:
        # never copy them into a tier.
        dropped = [j for j in self._deferred if self._job_request.get(j.job_id) == request_id]
        if dropped:
            self._deferred = [j for j in self._deferred if j not in dropped]
            error = "not stored: a load of the same request failed and is being recomputed"
            self._dropped.extend(JobResult(j.job_id, False, error=error) for j in dropped)
        self._failed_loads.setdefault(request_id, set()).update(job.dst_ids)
        self._held_since.setdefault(request_id, time.monotonic())

    def take_load_errors(self) -> set[int]:
        """GPU block ids whose load failed for good (engines with the load-error API)."""
        self.is_recovery_supported = True
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def close(self) -> None:
        self._is_closed.set()
        self._poller.join()
        self.engine.wait(timeout=30)
        self.engine.close()
        for storage in self.storages.values():
            storage.close()
        if self._registration is not None:
            self._registration.close()


def all_gather(value: Any) -> list[Any]:
    """``value`` from every rank: TensorRT-LLM's MPI helper where present, else torch's."""
    try:
        from tensorrt_llm._utils import mpi_allgather  # type: ignore[import-not-found]

        return list(mpi_allgather(value))
    except ImportError:
        pass
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
