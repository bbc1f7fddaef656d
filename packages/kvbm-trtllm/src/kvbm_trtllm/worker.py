"""The worker side of the connector: one per GPU rank, the data plane.

Runs in every rank's process (inside TensorRT-LLM's ``KvCacheConnectorWorker``).

Operations:
- ``register_kv_caches(tensors)``: wrap the engine's GPU pool, announce this rank's layout,
  wait for the leader's tier sizes (bounded by ``LEADER_WORKER_INIT_TIMEOUT_SECS``), build
  every configured tier's storage and handlers through the plugins, and report the blocks a
  persistent tier still holds from before a restart.
- ``start_iteration(plan)``: start the plan's jobs that need no forward pass (loads, host ->
  disk); loads of requests the engine runs this very iteration (sync loads) are waited for.
- ``after_forward(ready)``: start the jobs that read GPU blocks, ordered after ``ready`` (a CUDA
  event recorded on the forward stream; ``None`` on a CPU engine). Never syncs the host.
- ``get_finished(saving_ids, loading_ids)``: poll the handlers, send results to the leader, and
  return the request ids whose jobs all finished on this rank (each id once, only ids given).
- ``take_load_errors()``: GPU block ids whose load failed, for engines that recompute them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvbm_core.config import KvbmConfig
from kvbm_core.layout import KvLayout, LayoutKind
from kvbm_core.manager import IterationPlan
from kvbm_core.plugins import TierContext, get_plugin_manager, load_tier_specs
from kvbm_core.transfer import GPU, DevicePool, JobResult, Storage, TransferEngine, TransferJob

log = logging.getLogger("kvbm.worker")

__all__ = ["KvbmWorkerCore", "WorkerSetup"]


@dataclass(frozen=True)
class WorkerSetup:
    rank: int
    world_size: int
    tokens_per_block: int
    head_dim: int | None = None
    device: str = "cpu"


class KvbmWorkerCore:
    def __init__(self, config: KvbmConfig, setup: WorkerSetup, services: Any) -> None:
        self.config = config
        self.setup = setup
        self.services = services
        self.inbox = services.control.worker_inbox(setup.rank)
        self.layout: KvLayout | None = None
        self.storages: dict[str, Storage] = {}
        self.engine = TransferEngine()
        self._registration = None
        self._lock = threading.Lock()
        self._jobs: dict[int, TransferJob] = {}
        self._job_request: dict[int, int] = {}
        self._gpu_jobs: dict[int, set[int]] = {}
        self._load_jobs: dict[int, set[int]] = {}
        self._loading: set[int] = set()
        self._saving: set[int] = set()
        self._failed_loads: dict[int, set[int]] = {}
        self._load_errors: set[int] = set()
        self._deferred: list[TransferJob] = []
        self._dropped: list[JobResult] = []
        self.is_recovery_supported = False

    # ---- start-up --------------------------------------------------------------------------

    def register_kv_caches(self, tensors: Sequence[Any], layout: KvLayout) -> None:
        from kvbm_discovery import WORKER, InstanceInfo, TierSizes

        self.layout = layout
        # Tiers pin host memory only for a GPU pool: the device comes from the pool itself.
        self.setup = replace(self.setup, device=str(getattr(tensors[0], "device", "cpu")))
        self.storages[GPU] = DevicePool(tensors, layout)
        info = InstanceInfo(
            role=WORKER,
            rank=self.setup.rank,
            world_size=self.setup.world_size,
            bytes_per_block=layout.bytes_per_block,
            layout=layout,
            metadata={"num_gpu_blocks": str(self.storages[GPU].num_slots)},
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
        pm = get_plugin_manager(self.config.disabled_plugins)
        wanted = [name for name, slots in num_slots.items() if slots > 0]
        specs = load_tier_specs(pm, required=wanted)
        contexts = {}
        for name in wanted:
            spec = specs[name]
            contexts[name] = TierContext(
                layout=self.layout, num_slots=num_slots[name], rank=self.setup.rank,
                world_size=self.setup.world_size, device=self.setup.device, config=self.config,
            )
            self.storages[spec.medium] = spec.make_storage(contexts[name])
        for name in wanted:
            for handler in specs[name].make_handlers(self.storages, contexts[name]):
                self.engine.register(handler)
        log.info("kvbm worker %d: tiers %s, handlers %s", self.setup.rank,
                 {n: num_slots[n] for n in wanted}, sorted(self.engine.pairs))

    def persisted_blocks(self) -> dict[str, dict[int, int]]:
        """Blocks persistent tiers found at start, by tier medium: ``{hash: slot}``."""
        found = {}
        for medium, storage in self.storages.items():
            persisted = getattr(storage, "persisted_blocks", None)
            if callable(persisted):
                found[medium] = dict(persisted())
        return found

    # ---- per iteration ---------------------------------------------------------------------

    def start_iteration(self, plan: IterationPlan | None) -> None:
        if plan is None or plan.is_empty:
            return
        with self._lock:
            for job in plan.jobs:
                self._jobs[job.job_id] = job
            for request_id, job_ids in plan.gpu_job_ids.items():
                self._gpu_jobs.setdefault(request_id, set()).update(job_ids)
                for job_id in job_ids:
                    self._job_request[job_id] = request_id
            for request_id, job_ids in plan.load_job_ids.items():
                self._load_jobs.setdefault(request_id, set()).update(job_ids)
        now = [job for job in plan.jobs if job.src != GPU]
        self._deferred.extend(job for job in plan.jobs if job.src == GPU)
        if now:
            self.engine.submit(now)
        if plan.sync_request_ids:
            self._wait_for_loads(plan.sync_request_ids)

    def _wait_for_loads(self, request_ids: Iterable[int]) -> None:
        # Sync loads: the engine runs these requests in this iteration's forward pass.
        deadline = time.monotonic() + self.config.leader_worker_init_timeout_secs
        request_ids = list(request_ids)
        while any(self._load_jobs.get(r) for r in request_ids):
            self._collect(self._poll())
            if time.monotonic() > deadline:
                raise TimeoutError(f"kvbm worker {self.setup.rank}: sync loads did not finish")
            time.sleep(0.0002)

    def after_forward(self, ready: Any = None) -> None:
        jobs, self._deferred = self._deferred, []
        if jobs:
            self.engine.submit(jobs, ready)

    @property
    def has_deferred_jobs(self) -> bool:
        return bool(self._deferred)

    def get_finished(
        self, finished_gen_req_ids: Iterable[int], started_loading_req_ids: Iterable[int]
    ) -> tuple[list[int], list[int]]:
        self._collect(self._poll())
        with self._lock:
            self._saving.update(finished_gen_req_ids)
            self._loading.update(started_loading_req_ids)
            # A request that ended while loading (cancelled) is reported once, as saved, when
            # the copy into its blocks is done: never a second time as loaded.
            self._loading -= self._saving
            done_saving = [r for r in self._saving if not self._gpu_jobs.get(r)]
            done_loading = [r for r in self._loading if not self._load_jobs.get(r)]
            if not self.is_recovery_supported:
                done_loading = [r for r in done_loading if not self._failed_loads.get(r)]
            for request_id in done_saving:
                self._saving.discard(request_id)
                self._gpu_jobs.pop(request_id, None)
                self._failed_loads.pop(request_id, None)
            for request_id in done_loading:
                self._loading.discard(request_id)
                self._load_jobs.pop(request_id, None)
        return done_saving, done_loading

    def _poll(self) -> list[JobResult]:
        results = self.engine.poll()
        if self._dropped:
            results.extend(self._dropped)
            self._dropped = []
        return results

    def _collect(self, results: list[JobResult]) -> None:
        if not results:
            return
        from kvbm_discovery import Completions

        self.services.control.send_to_leader(Completions(self.setup.rank, tuple(results)))
        with self._lock:
            for result in results:
                job = self._jobs.pop(result.job_id, None)
                request_id = self._job_request.pop(result.job_id, None)
                if job is None:
                    continue
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

    def _on_failed_load(self, request_id: int, job: TransferJob) -> None:
        self._load_errors.update(job.dst_ids)
        # The engine recomputes from the failed block, so this iteration's forward pass will not
        # write the blocks its stores were planned for: never copy them into a tier.
        dropped = [j for j in self._deferred if self._job_request.get(j.job_id) == request_id]
        if dropped:
            self._deferred = [j for j in self._deferred if j not in dropped]
            error = "not stored: a load of the same request failed and is being recomputed"
            self._dropped.extend(JobResult(j.job_id, False, error=error) for j in dropped)
        self._failed_loads.setdefault(request_id, set()).update(job.dst_ids)
        if not self.is_recovery_supported:
            # Reporting the load finished would let the engine read KV that never arrived.
            log.error(
                "kvbm worker %d: load for request %d failed and this engine cannot recompute it; "
                "the request stays parked rather than run on missing KV", self.setup.rank, request_id,
            )

    def take_load_errors(self) -> set[int]:
        """GPU block ids whose load failed since the last call (engines that can recompute)."""
        self.is_recovery_supported = True
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def close(self) -> None:
        self.engine.wait(timeout=30)
        self.engine.close()
        for storage in self.storages.values():
            storage.close()
        if self._registration is not None:
            self._registration.close()


def layout_from_pool(tensor: Any, tokens_per_block: int, head_dim: int | None) -> KvLayout:
    """KvLayout of TensorRT-LLM's primary pool ``[blocks, layers, kv, heads*tokens*head_dim]``."""
    shape = list(tensor.shape)
    dtype = str(tensor.dtype).removeprefix("torch.")
    inner = 1
    for dim in shape[3:]:
        inner *= dim
    if head_dim is None:
        # Tiers move whole blocks as bytes: heads x head_dim only needs to multiply out right.
        head_dim = inner // tokens_per_block
    return KvLayout.from_pool_shape(shape, tokens_per_block, head_dim, dtype)


def layout_from_layers(tensors: Sequence[Any], tokens_per_block: int, head_dim: int | None) -> KvLayout:
    """KvLayout of per-layer pools ``[blocks, kv, heads*tokens*head_dim]`` (layer-separate)."""
    first = tensors[0]
    shape = [first.shape[0], len(tensors), *first.shape[1:]]
    layout = layout_from_pool(_Shaped(shape, first.dtype), tokens_per_block, head_dim)
    return KvLayout(
        layout.num_layers, layout.tokens_per_block, layout.num_kv_heads, layout.head_dim,
        layout.dtype, layout.kv_factor, LayoutKind.LAYER_SEPARATE,
    )


@dataclass
class _Shaped:
    shape: list[int]
    dtype: Any
