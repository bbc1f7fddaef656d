"""The ``SchedulerOutput`` an iteration reports to ``build_connector_meta``, per profile.

``build_scheduler_output(scheduled, requests, admitted_now, profile, tokens_per_block)``: one
``RequestData`` per scheduled request, as ``KvCacheConnectorSchedulerOutputRequest``
``.update_and_build_data`` in KC (``connectors/kv_cache_connector.py``@035ab91c):
- first appearance (``new_requests``): the whole prompt, every prompt block (device-reused ones
  too); later ones (``cached_requests``): only tokens and blocks added since the last report;
- a context request's ``computed_position`` is its ``context_current_position``, minus the
  tokens the connector matched if it was admitted this very iteration (``external_loads``); a
  generation step's is ``len(tokens) - 1``, with ``num_scheduled_tokens`` 1.

Shape by profile: ``"1.2"`` sends ``RequestData12`` (five fields). ``"main"`` sends main's
``RequestData``: plus ``block_hashes`` (the cumulative chain of beam 0's full blocks, the
executor's own hash, every report), ``priorities=None`` (no retention config),
``cache_salt`` (the request's salt string) and ``new_block_ids_by_layer_group=[new_block_ids]``
(one layer group, V1 manager). ``"v2"``: ``block_hashes=[]`` (KVCacheManagerV2 has none),
``new_block_ids_by_layer_group`` one list per layer group (``v2.py``); ``new_block_ids`` is
layer group 0's [U].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvbm_trtllm.executor.block_hash import block_hashes
from kvbm_trtllm.executor.profiles import TrtllmProfile
from kvbm_trtllm.executor.request_state import _Request, _State
from kvbm_trtllm.trtllm_api import RequestData, RequestData12, SchedulerOutput

__all__ = ["build_scheduler_output"]


def build_scheduler_output(
    scheduled: list[tuple[int, int]],
    requests: dict[int, _Request],
    admitted_now: dict[int, int],
    profile: TrtllmProfile,
    tokens_per_block: int,
    ids_by_group: Callable[[_Request, list[int]], list[list[int]]] | None = None,
) -> SchedulerOutput:
    """``admitted_now``: request id -> connector tokens, for requests admitted this iteration.

    ``ids_by_group(req, new_block_ids)``: ``new_block_ids_by_layer_group`` (default: one group).
    """
    out = SchedulerOutput(new_requests=[], cached_requests=[])
    by_group = ids_by_group or (lambda req, ids: [list(ids)])
    for rid, num_tokens in scheduled:
        req = requests[rid]
        data = _request_data(
            req, num_tokens, admitted_now.get(rid, 0), profile, tokens_per_block, by_group
        )
        (out.cached_requests if req.is_reported else out.new_requests).append(data)
        req.is_reported = True
        req.num_reported_tokens = len(req.llm.tokens)
        req.num_reported_blocks = len(req.block_ids)
    return out


def _request_data(
    req: _Request,
    num_tokens: int,
    num_matched_now: int,
    profile: TrtllmProfile,
    tokens_per_block: int,
    by_group: Callable[[_Request, list[int]], list[list[int]]],
) -> Any:
    tokens = list(req.llm.tokens)
    if req.state is _State.CONTEXT:
        # Equal to llm.context_current_position here; the executor's copy is what it computes.
        computed = req.num_computed
        if not req.is_reported:
            computed -= num_matched_now
    else:
        computed = len(tokens) - 1
    new_tokens = tokens[req.num_reported_tokens :]
    new_block_ids = req.block_ids[req.num_reported_blocks :]
    if not profile.has_main_request_data:
        return RequestData12(req.request_id, new_tokens, new_block_ids, computed, num_tokens)
    return RequestData(
        request_id=req.request_id,
        new_tokens=new_tokens,
        new_block_ids=new_block_ids,
        computed_position=computed,
        num_scheduled_tokens=num_tokens,
        # KVCacheManagerV2 reports no hashes (connectors compute their own).
        block_hashes=[]
        if profile.is_kv_cache_manager_v2
        else block_hashes(tokens, tokens_per_block, req.llm.lora_task_id, req.llm.cache_salt_id),
        priorities=None,
        cache_salt=req.spec.cache_salt,
        new_block_ids_by_layer_group=by_group(req, list(new_block_ids)),
    )
