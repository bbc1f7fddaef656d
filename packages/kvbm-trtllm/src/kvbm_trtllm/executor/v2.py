"""What the ``"v2"`` profile changes: TensorRT-LLM's KVCacheManagerV2 as a connector sees it.

``_KvCacheManagerCalls`` is a mixin of ``Executor``; every connector call whose form depends on
the KV cache manager goes through it. Sources: KC = ``connectors/kv_cache_connector.py``
@035ab91c, KL = ``connectors/kv_cache_layout.py``@0972960b, DOC =
``docs/source/features/kv-cache-connector.md``@0972960b; [U] marks what they left open.

- ``_register_pool()``: V1 ``register_kv_caches(pool.tensor)``; V2
  ``register_kv_cache_layout(layout)`` (KL; ``layer_groups.build_layout``). A worker without
  that method gets V1's call when the cache is one group and is refused otherwise.
- ``_check_layer_group_scheduler()``: with more than one layer group a scheduler that
  implements only the flat callbacks is rejected at bring-up (KC ``reject_flat_only_scheduler``).
- ``_report_alloc(req, block_ids)``: V1 ``update_state_after_alloc(req, block_ids)``; V2
  ``update_state_after_alloc_by_layer_group(req, lists)``, one list per group, aligned by block
  ordinal, with ``-1`` in a sliding group for every block no query from the request's
  computed position on reads. V2 allocates per context chunk, so these are the first chunk's
  blocks only (``_num_first_blocks``).
- ``_report_finished(req) -> bool``: V1 ``request_finished(req, block_ids)``; V2
  ``request_finished_by_layer_group(req, lists)`` with the window at the request's end.
- ``_new_ids_by_group(req, new_ids)``: ``RequestData.new_block_ids_by_layer_group``.
- ``_honour_offer(req, device_hit, n) -> m``: V2 commits what it can of an offer
  (``commit_new_matched_tokens``; "V2 may honour less than it was offered"). The executor's
  ``honour_offer(request_id, n) -> m`` option decides (default: all of it; ``m`` a multiple of
  the block size, or ``n``); when ``m < n``, ``cancel_load(req, device_hit + m, device_hit + n)``
  before ``update_state_after_alloc`` [U: the argument convention, token positions]. An async
  offer stays async even when ``m`` is 0: the request is parked until ``get_finished``
  reports it loaded, then computed from ``device_hit + m`` (the load is awaited and discarded).
- ``_trim_device_match(matched)``: a device prefix ends only where the sliding group's pages
  of its window hold KV. Blocks a connector loaded while their sliding page was reported
  ``-1`` have no KV there (``_mark_unwritten``); a match whose window reaches one is cut
  short, as V2's radix tree does not offer a page it lacks [U].
"""

from __future__ import annotations

from typing import Any

from kvbm_trtllm.executor.connector import ConnectorContractError
from kvbm_trtllm.executor.layer_groups import LayerGroups, build_layout
from kvbm_trtllm.executor.pool import BlockPool
from kvbm_trtllm.executor.profiles import TrtllmProfile
from kvbm_trtllm.executor.request_state import _Request

__all__ = ["_KvCacheManagerCalls"]


class _KvCacheManagerCalls:
    # Shared with Executor, which sets them.
    pool: BlockPool
    scheduler: Any
    worker: Any
    profile: TrtllmProfile
    chunk_size: int | None
    honour_offer: Any
    _unwritten_pages: set[int]

    @property
    def layer_groups(self) -> LayerGroups:
        return self.pool.groups

    @property
    def _is_v2(self) -> bool:
        return self.profile.is_kv_cache_manager_v2

    # ---- bring-up ----------------------------------------------------------------------------

    def _register_pool(self) -> None:
        if not self._is_v2:
            self.worker.register_kv_caches(self.pool.tensor)
            return
        register = getattr(self.worker, "register_kv_cache_layout", None)
        if register is not None:
            register(build_layout(self.pool))
        elif self.layer_groups.num_groups == 1:
            self.worker.register_kv_caches(self.pool.tensor)
        else:
            raise ConnectorContractError(
                f"{type(self.worker).__name__} has no register_kv_cache_layout; the KV cache has "
                f"{self.layer_groups.num_groups} layer groups and is not one pool tensor"
            )

    def _check_layer_group_scheduler(self) -> None:
        if self.scheduler is None or self.layer_groups.num_groups == 1:
            return
        cls = type(self.scheduler)
        for name in ("update_state_after_alloc_by_layer_group", "request_finished_by_layer_group"):
            method = getattr(cls, name, None)
            if method is None or getattr(method, "_is_flat_default", False):
                raise ConnectorContractError(
                    f"{cls.__name__} implements only the flat callbacks, but the KV cache has "
                    f"{self.layer_groups.num_groups} layer groups; implement {name} (TensorRT-LLM's "
                    f"reject_flat_only_scheduler refuses it at bring-up)"
                )

    # ---- allocation ---------------------------------------------------------------------------

    def _num_first_blocks(self, req: _Request) -> int:
        """Blocks allocated at admission: the whole prompt (V1), the first chunk's (V2)."""
        t = self.pool.tokens_per_block
        if not self._is_v2 or self.chunk_size is None:
            return -(-req.prompt_len // t)
        end = min(req.prompt_len, req.num_computed + self.chunk_size)
        return -(-end // t)

    def _by_group(self, block_ids: list[int], first_ordinal: int, position: int) -> list[list[int]]:
        return self.layer_groups.by_group(
            block_ids, first_ordinal, position, self.pool.tokens_per_block, self.pool.num_blocks
        )

    def _report_alloc(self, req: _Request, block_ids: list[int]) -> None:
        if self.scheduler is None:
            return
        if not self._is_v2:
            self.scheduler.update_state_after_alloc(req.llm.py_view, list(block_ids))
            return
        lists = self._by_group(block_ids, 0, req.num_computed)
        self._mark_unwritten(req, block_ids, lists)
        _call_by_layer_group(
            self.scheduler, "update_state_after_alloc", req.llm.py_view, lists
        )

    def _report_finished(self, req: _Request) -> bool:
        if self.scheduler is None:
            return False
        if not self._is_v2:
            return bool(self.scheduler.request_finished(req.llm.py_view, list(req.block_ids)))
        lists = self._by_group(req.block_ids, 0, len(req.device_tokens))
        return bool(
            _call_by_layer_group(self.scheduler, "request_finished", req.llm.py_view, lists)
        )

    def _new_ids_by_group(self, req: _Request, new_ids: list[int]) -> list[list[int]]:
        if not self._is_v2:
            return [list(new_ids)]
        first = len(req.block_ids) - len(new_ids)
        return self._by_group(new_ids, first, req.num_computed)

    def _honour_offer(self, req: _Request, device_hit: int, offered: int) -> int:
        if not self._is_v2 or self.honour_offer is None or offered == 0:
            return offered
        honoured = int(self.honour_offer(req.request_id, offered))
        t = self.pool.tokens_per_block
        if not 0 <= honoured <= offered or (honoured % t and honoured != offered):
            raise ValueError(
                f"honour_offer({req.request_id}, {offered}) returned {honoured}; it must be a "
                f"multiple of {t} tokens in [0, {offered}] (or {offered} itself)"
            )
        if honoured < offered and self.scheduler is not None:
            cancel = getattr(self.scheduler, "cancel_load", None)
            if cancel is not None:
                cancel(req.llm.py_view, device_hit + honoured, device_hit + offered)
        return honoured

    # ---- sliding-window pages without KV ----------------------------------------------------------

    def _mark_unwritten(self, req: _Request, block_ids: list[int], lists: list[list[int]]) -> None:
        t = self.pool.tokens_per_block
        first_loaded = req.num_device_hit // t
        self._unwritten_pages.difference_update(block_ids[first_loaded:])
        if req.num_connector_hit == 0 or not self.layer_groups.has_windows:
            return
        end_loaded = (req.num_device_hit + req.num_connector_hit) // t
        for ordinal in range(first_loaded, end_loaded):
            if any(pages[ordinal] < 0 for pages in lists):
                self._unwritten_pages.add(block_ids[ordinal])

    def _trim_device_match(self, matched: list[int]) -> list[int]:
        if not self._is_v2 or not self._unwritten_pages:
            return matched
        t = self.pool.tokens_per_block
        while matched:
            position = len(matched) * t
            lists = self._by_group(matched, 0, position)
            window_ok = all(
                matched[o] not in self._unwritten_pages
                for o in range(len(matched))
                if all(pages[o] >= 0 for pages in lists)
            )
            if window_ok:
                break
            matched = matched[:-1]
        return matched


def _call_by_layer_group(scheduler: Any, name: str, request: Any, lists: list[list[int]]) -> Any:
    """``<name>_by_layer_group`` when the scheduler has it; the flat form for one group."""
    grouped = getattr(scheduler, f"{name}_by_layer_group", None)
    if grouped is not None:
        return grouped(request, lists)
    if len(lists) != 1:
        raise ConnectorContractError(
            f"{type(scheduler).__name__} has no {name}_by_layer_group for {len(lists)} layer groups"
        )
    return getattr(scheduler, name)(request, lists[0])
