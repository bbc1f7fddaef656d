"""The leader side of the connector: rank 0's control plane.

Runs in the scheduler process (inside the engine adapter's scheduler half, e.g. TensorRT-LLM's
``KvCacheConnectorScheduler``); holds no KV bytes.

Operations:
- ``start()``: in the background, wait for every worker rank to announce its layout (bounded
  by ``LEADER_WORKER_INIT_TIMEOUT_SECS``), size every installed tier through its spec's
  ``num_slots`` (the built-in ones: GB over the bytes of one block on all ranks, or the
  block-count overrides), tell the workers, and build the block manager over the tiers that
  have slots, by level.
  Engines build the leader and workers concurrently, so this must not block construction.
- ``manager``: the :class:`~kvbm_core.manager.BlockManager`, once ready (``wait_ready``).
- ``lock``: held by every caller of the manager (the engine's thread and the leader's own).
- ``drain_results()``: apply the job results workers sent since the last call, and act on
  failed loads (below). A background thread calls it too, so results are acted on while the
  engine runs no forward pass (a parked request may be all there is). That thread also fails
  jobs some rank has not reported within ``KVBM_JOB_TIMEOUT_SECS`` (``fail_late_jobs``).
- ``track(request_id, rewind)`` / ``forget(request_id)``: how to rewind a request to a token
  position (the adapter's callable), kept while the request may still have to be rewound.
- ``salt_for(inputs)``: the block-hash seed of a request: the model identity and the request's
  :class:`~kvbm_runtime.salt.SaltInputs` (LoRA adapter, tenant salt), which the engine's
  adapter reads off its own request object.

Failed loads (``BlockManager.take_load_outcomes``): a retry goes to the ranks that failed as a
``LoadRecovery`` with jobs. With no retry left, a single-rank engine is told to recompute:
the adapter's ``rewind`` (TensorRT-LLM: the request's writable ``context_current_position``)
takes it back to the first token whose KV did not arrive, then an empty ``LoadRecovery`` lets
the worker report it loaded. With several ranks that cannot work (each rank holds its own request object), so
every rank fails the request together through the next plan.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kvbm_core.config import KvbmConfig
from kvbm_core.events import EventSink
from kvbm_core.hashing import salt_hash
from kvbm_core.manager import BlockManager, LoadOutcome, TierSlots
from kvbm_core.messages import (
    Completions,
    LoadRecovery,
    Message,
    RestoreAck,
    StoredBlocks,
    StoredBlocksChunk,
    TierSizes,
    WorkerError,
)
from kvbm_core.metrics import KvbmStats
from kvbm_core.plugins import TierSpec, load_tier_specs, shared_plugin_manager
from kvbm_core.tier_options import read_tier_options
from kvbm_discovery.bounded_log import RateLimitedLog
from kvbm_discovery.discovery import LEADER, WORKER, InstanceInfo, Registration
from kvbm_discovery.restore_assembly import RestoreAssembly
from kvbm_runtime.salt import SaltInputs
from kvbm_runtime.services import RuntimeServices

log = logging.getLogger("kvbm.leader")

__all__ = ["KvbmLeaderCore"]

_TICK_SECS = 0.005


class KvbmLeaderCore:
    def __init__(
        self,
        config: KvbmConfig,
        services: RuntimeServices,
        world_size: int,
        block_size: int,
        model_id: str | None,
        stats: KvbmStats | None = None,
    ) -> None:
        self.config = config
        self.services = services
        self.world_size = world_size
        self.block_size = block_size
        self.model_id = model_id if model_id is not None else config.model_id
        self.stats = stats if stats is not None else KvbmStats()
        self.inbox = services.control.leader_inbox()
        self._bad_message_log = RateLimitedLog(log)
        self.events: EventSink | None = services.make_event_sink("leader") if config.events else None
        self.manager: BlockManager | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._registration: Registration | None = None
        self._salts: dict[SaltInputs, int] = {}
        self._restored: dict[str, dict[int, dict[int, int]]] = {}
        self._restores = RestoreAssembly(world_size)
        self._specs: dict[str, TierSpec] = {}
        self._rewinds: dict[int, Callable[[int], None]] = {}
        self.worker_metadata: dict[str, str] = {}  # rank 0's InstanceInfo.metadata, once ready
        self._bytes_per_block = 0
        self.lock = threading.RLock()
        self._is_closed = threading.Event()

    def start(self) -> None:
        self._registration = self.services.discovery.register(
            InstanceInfo(role=LEADER, world_size=self.world_size)
        )
        threading.Thread(target=self._initialize, name="kvbm-leader-init", daemon=True).start()
        threading.Thread(target=self._tick, name="kvbm-leader-tick", daemon=True).start()

    def _tick(self) -> None:
        while not self._is_closed.wait(_TICK_SECS):
            try:
                with self.lock:
                    if self.manager is not None:
                        self.manager.fail_late_jobs()
                    self.drain_results()
            except Exception:  # the thread must survive anything; the error is visible here
                log.exception("kvbm leader: handling worker results failed")

    def _initialize(self) -> None:
        try:
            self.manager = self._build_manager()
        except BaseException as exc:  # surfaced by wait_ready on the engine's thread
            self.error = exc
            log.error("kvbm leader could not start: %s", exc)
        finally:
            self._ready.set()

    def _build_manager(self) -> BlockManager:
        peers = self.services.discovery.wait_for_peers(self.world_size)
        workers = [info for info in peers if info.role == WORKER]
        self.worker_metadata = dict(workers[0].metadata) if workers else {}
        bytes_per_block = sum(info.bytes_per_block for info in workers)
        self._bytes_per_block = bytes_per_block
        sizes = self._tier_sizes(bytes_per_block)
        for info in workers:  # per rank: acknowledged delivery (broadcast is best effort)
            self.services.control.send_to_worker(info.rank, TierSizes(sizes))
        log.info("kvbm leader: %d worker(s), %d bytes per block, tiers %s",
                 len(workers), bytes_per_block, sizes)
        return BlockManager(
            self._tiers(sizes), self.block_size, num_ranks=self.world_size,
            bytes_per_block=bytes_per_block, events=self.events, stats=self.stats,
            job_timeout_secs=self.config.job_timeout_secs,
        )

    def _tier_sizes(self, bytes_per_block: int) -> dict[str, int]:
        """Blocks of every tier that has any, top tier first."""
        # The built-in tiers' own settings name them: a missing plugin is an error, not "off".
        enabled = [n for n, on in (("cpu", self.config.cpu_enabled), ("disk", self.config.disk_enabled)) if on]
        self._specs = load_tier_specs(shared_plugin_manager(self.config.disabled_plugins), enabled)
        sizes = {}
        for name, spec in self._specs.items():
            if spec.num_slots is None:
                continue
            options = read_tier_options(spec.options, self.config)
            num_slots = spec.num_slots(self.config, options, bytes_per_block)
            if num_slots > 0:
                sizes[name] = num_slots
        return sizes

    def _tiers(self, sizes: dict[str, int]) -> list[TierSlots]:
        tiers = []
        for name, num_slots in sizes.items():
            spec = self._specs[name]
            admission = spec.make_admission(self.config) if spec.make_admission else None
            presence = self._presence(name)
            tiers.append(TierSlots(name, num_slots, spec.stores_from, admission, presence))
        return tiers

    def _presence(self, name: str) -> Any:
        spec = self._specs[name]
        if spec.make_presence is None:
            return None
        config = replace(self.config, model_id=self.model_id)  # keys name the model served
        options = read_tier_options(spec.options, config)
        return spec.make_presence(config, options, self._bytes_per_block, self.world_size)

    def wait_ready(self, timeout: float | None = None) -> BlockManager:
        wait = self.config.leader_worker_init_timeout_secs if timeout is None else timeout
        if not self._ready.wait(wait):
            raise TimeoutError(
                f"kvbm leader: workers did not all register within {wait:.0f} s "
                "(KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS)"
            )
        if self.error is not None:
            raise RuntimeError(f"kvbm leader failed to start: {self.error}") from self.error
        assert self.manager is not None
        return self.manager

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.manager is not None

    def drain_results(self) -> None:
        if self.manager is None:
            return
        for message in self.inbox.poll():
            try:
                self._handle(message)
            except Exception as exc:  # nothing a peer sends may raise in the engine's thread
                self.stats.add("control_rejected_messages")
                self._bad_message_log.warning(
                    "handle", "kvbm leader: dropping a %s it could not apply: %r",
                    type(message).__name__, exc,
                )
        for failure in self._restores.take_expired():
            self.stats.add("restore_failures")
            log.error("kvbm leader: the %s restore did not complete within %.0f s (missing %s); "
                      "those blocks are not served", failure.tier, self._restores.timeout_secs, failure.missing)
        tally = self.inbox.take_tallies()
        self.stats.add("control_rejected_messages", tally.num_rejected)
        self.stats.add("control_dropped_messages", tally.num_dropped)
        for outcome in self.manager.take_load_outcomes():
            self._act_on(outcome)

    def _handle(self, message: Message) -> None:
        assert self.manager is not None
        if getattr(message, "rank", 0) not in range(self.world_size):
            self.stats.add("control_rejected_messages")
            self._bad_message_log.warning(
                "rank", "kvbm leader: ignoring a %s from rank %r (world size %d)",
                type(message).__name__, getattr(message, "rank", None), self.world_size,
            )
        elif isinstance(message, Completions):
            self.manager.apply_results(message.rank, message.results)
        elif isinstance(message, StoredBlocks):
            self._restore(message)
        elif isinstance(message, StoredBlocksChunk):
            self._restore_chunk(message)
        elif isinstance(message, WorkerError):
            log.error("kvbm worker rank %d reported: %.2000s", message.rank, message.error)

    def _act_on(self, outcome: LoadOutcome) -> None:
        assert self.manager is not None
        if outcome.retry_jobs:
            for rank in outcome.retry_ranks:
                self.services.control.send_to_worker(
                    rank, LoadRecovery(outcome.request_id, outcome.retry_jobs)
                )
            return
        rewind = self._rewinds.get(outcome.request_id)
        if self.world_size == 1 and rewind is not None and outcome.recompute_from_token is not None:
            rewind(outcome.recompute_from_token)
            log.warning(
                "kvbm leader: KV of request %d from token %d did not load; the engine recomputes it",
                outcome.request_id, outcome.recompute_from_token,
            )
            self.services.control.send_to_worker(0, LoadRecovery(outcome.request_id))
            return
        log.error("kvbm leader: KV of request %d could not be loaded; failing it", outcome.request_id)
        self.manager.fail_loads([outcome.request_id])

    def track(self, request_id: int, rewind: Callable[[int], None]) -> None:
        """Keep how to rewind a request (to a token position) while a load may still fail."""
        self._rewinds[request_id] = rewind

    def forget(self, request_id: int) -> None:
        self._rewinds.pop(request_id, None)

    def _restore(self, message: StoredBlocks) -> None:
        # Every rank must hold a block in the same slot before any rank's copy is trusted.
        assert self.manager is not None
        if not self._is_restorable(message.tier):
            return
        pending = self._restored.setdefault(message.tier, {})
        pending[message.rank] = dict(message.blocks)
        if len(pending) < self.world_size:
            return
        common = dict(pending[0])
        for blocks in pending.values():
            common = {h: s for h, s in common.items() if blocks.get(h) == s}
        self.manager.restore(message.tier, common)
        log.info("kvbm leader: %d %s block(s) restored from before the restart", len(common), message.tier)

    def _restore_chunk(self, chunk: StoredBlocksChunk) -> None:
        """One part of a rank's restore: acknowledged, and applied once every rank's parts are in."""
        assert self.manager is not None
        if not self._is_restorable(chunk.tier):
            return
        if not self._restores.add(chunk, self.manager.indexes[chunk.tier].num_slots):
            self.stats.add("restore_failures")
            log.error("kvbm leader: rank %d's %s restore claims more blocks than the tier has slots; "
                      "dropped", chunk.rank, chunk.tier)
            return
        common = self._restores.take_complete(chunk.tier)
        if common is not None:
            self.manager.restore(chunk.tier, common)
            log.info("kvbm leader: %d %s block(s) restored from before the restart", len(common), chunk.tier)
        # After applying: the last rank's last acknowledgement means "restored".
        self.services.control.send_to_worker(
            chunk.rank, RestoreAck(chunk.rank, chunk.tier, chunk.restore_id, chunk.chunk_index)
        )

    def _is_restorable(self, tier: str) -> bool:
        assert self.manager is not None
        spec = self._specs.get(tier)
        if spec is None or not spec.is_persistent or tier not in self.manager.indexes:
            # A tier that keeps nothing across restarts (host memory) cannot have blocks from
            # before one: such a "restore" is a mistake or a forgery; an unknown tier has no index.
            log.warning("kvbm leader: ignoring restored blocks for tier %.40r", tier)
            return False
        return True

    def salt_for(self, inputs: SaltInputs) -> int:
        """The block-hash seed of a request with these salt inputs, under this leader's model."""
        salt = self._salts.get(inputs)
        if salt is None:
            salt = self._salts[inputs] = salt_hash(self.model_id, inputs.lora, inputs.cache_salt)
        return salt

    def close(self) -> None:
        self._is_closed.set()
        for tier in self.manager.tiers if self.manager is not None else ():
            if tier.presence is not None:
                tier.presence.close()
        if self.events is not None:
            self.events.close()
        if self._registration is not None:
            self._registration.close()
