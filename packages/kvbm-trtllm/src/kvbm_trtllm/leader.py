"""The leader side of the connector: rank 0's control plane.

Runs in the scheduler process (inside TensorRT-LLM's ``KvCacheConnectorScheduler``); holds
no KV bytes.

Operations:
- ``start()``: in the background, wait for every worker rank to announce its layout (bounded
  by ``LEADER_WORKER_INIT_TIMEOUT_SECS``), size the tiers (GB over the bytes of one block on
  all ranks, or the block-count overrides), tell the workers, and build the block manager.
  Engines build the leader and workers concurrently, so this must not block construction.
- ``manager``: the :class:`~kvbm_core.manager.BlockManager`, once ready (``wait_ready``).
- ``drain_results()``: apply the job results workers sent since the last call.
- ``salt_for(request)``: the block-hash seed of a request (model, LoRA adapter, cache salt).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kvbm_core.admission import AlwaysAdmit, FrequencyFilter
from kvbm_core.config import KvbmConfig
from kvbm_core.events import EventSink
from kvbm_core.hashing import salt_hash
from kvbm_core.manager import BlockManager, TierSlots
from kvbm_core.metrics import KvbmStats
from kvbm_core.plugins import get_plugin_manager, load_tier_specs
from kvbm_core.transfer import CPU, DISK

log = logging.getLogger("kvbm.leader")

__all__ = ["KvbmLeaderCore"]


class KvbmLeaderCore:
    def __init__(
        self,
        config: KvbmConfig,
        services: Any,
        world_size: int,
        block_size: int,
        model_id: str | None,
        stats: KvbmStats | None = None,
    ) -> None:
        self.config = config
        self.services = services
        self.world_size = world_size
        self.block_size = block_size
        self.model_id = config.model_id or model_id
        self.stats = stats if stats is not None else KvbmStats()
        self.inbox = services.control.leader_inbox()
        self.events: EventSink | None = services.make_event_sink("leader") if config.events else None
        self.manager: BlockManager | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._registration = None
        self._salts: dict[tuple[str | None, str | None], int] = {}
        self._restored: dict[str, dict[int, dict[int, int]]] = {}

    def start(self) -> None:
        from kvbm_discovery import LEADER, InstanceInfo

        self._registration = self.services.discovery.register(
            InstanceInfo(role=LEADER, world_size=self.world_size)
        )
        threading.Thread(target=self._initialize, name="kvbm-leader-init", daemon=True).start()

    def _initialize(self) -> None:
        try:
            self.manager = self._build_manager()
        except BaseException as exc:  # surfaced by wait_ready on the engine's thread
            self.error = exc
            log.error("kvbm leader could not start: %s", exc)
        finally:
            self._ready.set()

    def _build_manager(self) -> BlockManager:
        from kvbm_discovery import TierSizes

        peers = self.services.discovery.wait_for_peers(self.world_size)
        workers = [info for info in peers if info.role == "worker"]
        bytes_per_block = sum(info.bytes_per_block for info in workers)
        sizes = self._tier_sizes(bytes_per_block)
        for info in workers:  # per rank: acknowledged delivery (broadcast is best effort)
            self.services.control.send_to_worker(info.rank, TierSizes(sizes))
        tiers = self._tiers(sizes)
        admission = (
            AlwaysAdmit() if self.config.disable_disk_offload_filter else FrequencyFilter()
        )
        log.info("kvbm leader: %d worker(s), %d bytes per block, tiers %s",
                 len(workers), bytes_per_block, sizes)
        return BlockManager(
            tiers, self.block_size, num_ranks=self.world_size, bytes_per_block=bytes_per_block,
            admission=admission, events=self.events, stats=self.stats,
        )

    def _tier_sizes(self, bytes_per_block: int) -> dict[str, int]:
        sizes = {}
        if self.config.cpu_enabled:
            sizes["cpu"] = self.config.num_cpu_blocks(bytes_per_block)
        if self.config.disk_enabled:
            sizes["disk"] = self.config.num_disk_blocks(bytes_per_block)
        return sizes

    def _tiers(self, sizes: dict[str, int]) -> list[TierSlots]:
        specs = load_tier_specs(get_plugin_manager(self.config.disabled_plugins), required=sizes)
        return [TierSlots(name, specs[name].medium, slots) for name, slots in sizes.items()]

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
        from kvbm_discovery import Completions, StoredBlocks, WorkerError

        if self.manager is None:
            return
        for message in self.inbox.poll():
            if isinstance(message, Completions):
                self.manager.apply_results(message.rank, message.results)
            elif isinstance(message, StoredBlocks):
                self._restore(message)
            elif isinstance(message, WorkerError):
                log.error("kvbm worker rank %d reported: %s", message.rank, message.error)

    def _restore(self, message: Any) -> None:
        # Every rank must hold a block in the same slot before any rank's copy is trusted.
        assert self.manager is not None
        pending = self._restored.setdefault(message.tier, {})
        pending[message.rank] = dict(message.blocks)
        if len(pending) < self.world_size:
            return
        common = dict(pending[0])
        for blocks in pending.values():
            common = {h: s for h, s in common.items() if blocks.get(h) == s}
        name = {CPU: "cpu", DISK: "disk"}.get(message.tier, message.tier)
        if name in self.manager.indexes:
            self.manager.restore(name, common)
            log.info("kvbm leader: %d %s block(s) restored from before the restart", len(common), name)

    def salt_for(self, request: Any) -> int:
        lora = getattr(request, "lora_name", None)
        cache_salt = getattr(request, "cache_salt", None)
        key = (lora if isinstance(lora, str) else None, cache_salt if isinstance(cache_salt, str) else None)
        salt = self._salts.get(key)
        if salt is None:
            salt = self._salts[key] = salt_hash(self.model_id, key[0], key[1])
        return salt

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        if self._registration is not None:
            self._registration.close()
