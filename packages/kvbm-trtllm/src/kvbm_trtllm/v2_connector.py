"""kvbm's connector under TensorRT-LLM's KVCacheManagerV2: layer groups and V2-only calls.

Sources: KC = ``_torch/pyexecutor/connectors/kv_cache_connector.py``@035ab91c, KL =
``connectors/kv_cache_layout.py``@0972960b, DOC = ``docs/source/features/kv-cache-connector.md``.

Leader (rank 0; ``LayerGroupLeader``, mixed into ``KvbmConnectorLeader``):
- kvbm keys blocks on the pages of one full-attention group, the *primary* (the worker finds it
  in the layout and announces its position, ``PRIMARY_GROUP_KEY``). The block manager plans
  with those pages as block ids, exactly as with a V1 pool.
- ``update_state_after_alloc_by_layer_group`` / ``request_finished_by_layer_group``: the
  primary list goes to the flat methods; every other group's page of each block is recorded
  (``LayerGroupPages``) and sent with the next plan (``LayerGroupPlan``), so workers address
  each block in every page space. A ``-1`` entry (BAD_PAGE_INDEX, a page a sliding window left)
  is recorded for blocks allocated fresh and ignored for device-reused ones, which other
  requests may still hold with the page (``valid_page_slots`` semantics: no transfer is ever
  built against a ``-1``). A ``-1`` in the primary group is an error.
- ``build_connector_meta`` reads ``RequestData.new_block_ids_by_layer_group`` the same way.
  ``RequestData.block_hashes`` and ``priorities`` are never read (V2 sends ``[]`` / None):
  kvbm hashes tokens itself, salted with ``RequestData.cache_salt`` where the request
  object tells none.
- ``cancel_load(request, start, end)`` (DOC: V2 does not honour offered tokens ``[start,
  end)``): kvbm's planned load is replaced by one of the honoured part only (the match is
  looked up again up to ``start``), so no block past what V2 allocated is written. Whether
  the offer was async or not, the worker still reports the request loaded once its (smaller)
  load is done; V2 awaits and discards what it did not honour.
- ``request_reset(request)`` (DOC: V2 rolled the request back, pause or replay): kvbm forgets
  the request's plan state (its pinned reads, its store progress); jobs already sent still
  complete, and the blocks they touch are what ``request_finished`` reports as held. The
  replay is a new request to kvbm.

Worker (every rank; ``LayerGroupWorker``, mixed into ``KvbmConnectorWorker``):
``register_kv_cache_layout(layout)`` builds a ``RegionPool`` (``v2_layout``) and registers it;
``start_load_kv`` applies a ``LayerGroupPlan``'s pages before the plan's jobs start.

Attention DP: both classes declare ``supports_attention_dp = True``. Under ADP every rank runs a
scheduler and a worker over its own requests and its own KV (DOC); kvbm's key never contains the
rank (model identity, block size, full prefix, LoRA and cache salt only), so ranks share hits.
Each ADP rank is its own kvbm group of one rank (``for_attention_dp``): a leader and a worker
in namespace ``<namespace>-adp<rank>``, with its own host tier; nothing waits on another rank.
The rank is ``llm_args.extra["attention_dp_rank"]`` where an engine passes it (the reference
executor's in-process ranks), else TensorRT-LLM's MPI rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kvbm_core.config import KvbmConfig
from kvbm_core.manager import IterationPlan
from kvbm_core.regions import RegionPool
from kvbm_trtllm.trtllm_api import current_rank

__all__ = ["attention_dp_rank", "for_attention_dp", "PRIMARY_GROUP_KEY", "LayerGroupPlan", "LayerGroupPages", "LayerGroupLeader", "LayerGroupWorker"]

PRIMARY_GROUP_KEY = "kv_primary_layer_group"


def attention_dp_rank(llm_args: Any) -> int | None:
    """This process's attention-DP rank, or ``None`` when attention DP is off."""
    if not getattr(llm_args, "enable_attention_dp", False):
        return None
    extra = getattr(llm_args, "extra", None)
    given = extra.get("attention_dp_rank") if isinstance(extra, dict) else None
    return int(given) if given is not None else current_rank()


def for_attention_dp(config: KvbmConfig, llm_args: Any) -> KvbmConfig:
    """The config of this ADP rank's own kvbm group (unchanged without attention DP)."""
    rank = attention_dp_rank(llm_args)
    return config if rank is None else replace(config, namespace=f"{config.namespace}-adp{rank}")


@dataclass
class LayerGroupPlan:
    """An ``IterationPlan`` plus the non-primary pages of blocks reported since the last one."""

    plan: IterationPlan
    block_ids: list[int]
    pages: list[list[int | None]]  # per non-primary group, aligned with block_ids

    @property
    def iteration(self) -> int:
        return self.plan.iteration


class LayerGroupPages:
    """Leader side: by-layer-group lists -> primary block ids, and pages owed to workers."""

    def __init__(self) -> None:
        self.primary = 0
        self._pending: dict[int, list[int | None]] = {}

    def primary_ids(self, lists: list[list[int]], num_reused: int = 0, is_fresh: bool = True) -> list[int]:
        """The primary group's pages; records the others' (a ``-1`` only where ``is_fresh``,
        for ordinals from ``num_reused`` on)."""
        if len(lists) <= 1:
            return [b for b in (lists[0] if lists else []) if b >= 0]
        if self.primary >= len(lists):
            raise ValueError(
                f"{len(lists)} layer groups reported, but the primary group is {self.primary}"
            )
        primary = lists[self.primary]
        others = [group for i, group in enumerate(lists) if i != self.primary]
        for ordinal, block_id in enumerate(primary):
            if block_id < 0:
                raise ValueError(
                    f"block {ordinal} has no page in full-attention layer group {self.primary}; "
                    "kvbm keys blocks on that group"
                )
            may_clear = is_fresh and ordinal >= num_reused
            pages = [_page(group, ordinal, may_clear) for group in others]
            if any(p is not None for p in pages) or block_id not in self._pending:
                self._pending[block_id] = pages
        return list(primary)

    def wrap(self, plan: IterationPlan) -> IterationPlan | LayerGroupPlan:
        if not self._pending:
            return plan
        pending, self._pending = self._pending, {}
        block_ids = list(pending)
        num_others = len(next(iter(pending.values())))
        pages = [[pending[b][g] for b in block_ids] for g in range(num_others)]
        return LayerGroupPlan(plan, block_ids, pages)


def _page(group: list[int], ordinal: int, may_clear: bool) -> int | None:
    page = group[ordinal] if ordinal < len(group) else -1
    if page >= 0:
        return page
    return -1 if may_clear else None


class LayerGroupLeader:
    """The V2 half of ``KvbmConnectorLeader`` (module doc). Expects ``core``, ``_manager()``
    and the flat scheduler methods from the class it is mixed into."""

    supports_attention_dp = True
    core: Any
    salts: Any
    _manager: Any
    update_state_after_alloc: Any
    request_finished: Any
    get_num_new_matched_tokens: Any

    def _layer_groups(self) -> LayerGroupPages:
        pages: LayerGroupPages | None = getattr(self, "_pages", None)
        if pages is None:
            pages = self._pages = LayerGroupPages()
            self._device_hits: dict[int, int] = {}
        self._manager()  # the primary group is known once the workers registered
        pages.primary = int(self.core.worker_metadata.get(PRIMARY_GROUP_KEY, 0))
        return pages

    def note_device_hit(self, request_id: int, num_computed_tokens: int) -> None:
        self._layer_groups()
        self._device_hits[request_id] = num_computed_tokens

    def update_state_after_alloc_by_layer_group(
        self, request: Any, block_ids_by_layer_group: list[list[int]]
    ) -> None:
        with self.core.lock:
            pages = self._layer_groups()
            hit = self._device_hits.pop(int(request.request_id), 0)
            num_reused = hit // int(self.core.block_size)
            block_ids = pages.primary_ids(block_ids_by_layer_group, num_reused)
        self.update_state_after_alloc(request, block_ids)

    def request_finished_by_layer_group(
        self, request: Any, cache_block_ids_by_layer_group: list[list[int]]
    ) -> bool:
        with self.core.lock:
            lists = cache_block_ids_by_layer_group
            primary = lists[self._layer_groups().primary] if len(lists) > 1 else lists[0]
        return bool(self.request_finished(request, [b for b in primary if b >= 0]))

    def block_ids_of(self, data: Any) -> list[int]:
        """``RequestData``'s new blocks, by layer group when it has several (pages recorded)."""
        lists = getattr(data, "new_block_ids_by_layer_group", None) or []
        if len(lists) <= 1:
            return list(data.new_block_ids)
        return self._layer_groups().primary_ids(lists, is_fresh=False)

    def wrap_plan(self, plan: IterationPlan) -> Any:
        pages = getattr(self, "_pages", None)
        return plan if pages is None else pages.wrap(plan)

    def cancel_load(self, request: Any, start: int, end: int) -> None:
        with self.core.lock:
            manager = self._manager()
            request_id = int(request.request_id)
            manager.cancel(request_id)
            salt = self.salts.salt_for(request)
            if salt is None or start <= 0:
                return
            tokens = list(request.get_tokens(0))[: start + 1]
            hit = getattr(self, "_device_hits", {}).get(request_id, 0)
            if hit < start:
                manager.lookup(request_id, tokens, hit, salt, is_sync_load=not self.core.config.async_load)

    def request_reset(self, request: Any) -> None:
        with self.core.lock:
            request_id = int(request.request_id)
            getattr(self, "_device_hits", {}).pop(request_id, None)
            self.core.forget(request_id)
            self._manager().cancel(request_id)


class LayerGroupWorker:
    """The V2 half of ``KvbmConnectorWorker`` (module doc)."""

    supports_attention_dp = True
    region_pool: RegionPool | None = None

    def apply_pages(self, meta: Any) -> Any:
        """The plan inside a ``LayerGroupPlan``, after recording its pages."""
        if not isinstance(meta, LayerGroupPlan):
            return meta
        if self.region_pool is None:
            raise TypeError(
                "layer-group pages arrived but the KV cache was registered as one pool; "
                "KVCacheManagerV2 must call register_kv_cache_layout"
            )
        self.region_pool.set_pages(meta.block_ids, meta.pages)
        return meta.plan
