"""Rank 0's half of an iteration: arrivals, admission, the batch, the connector's metadata.

``_Scheduling`` is a mixin of ``Executor`` (it shares the executor's request tables). Operations:
- ``_plan() -> _Plan`` (rank 0): arrivals; admission in FIFO order under GUARANTEED_NO_EVICT (a
  request is admitted only when the pool can hold its whole sequence), each with a device prefix
  match, then ``_ask_connector`` and ``_admit``; the batch (``_schedule``: generation steps
  first, then context chunks within the token budget); ``add_token`` blocks for generation
  steps; the ``SchedulerOutput`` and ``build_connector_meta`` when anything was scheduled or
  admitted.
- ``_apply_plan(plan)`` (other ranks): the same admissions and allocations, so block ids agree.

``_ask_connector``: ``get_num_new_matched_tokens(cpp_view, device_hit)`` once per request,
checked (``n + device_hit < prompt_len``, never ``(0, True)``), only when block reuse is on:
with it off the C++ ``addSequence`` takes the non-reuse path that is not given the connector
(``kvCacheManager.cpp``, index id 1277673704) and the request gets 0 external tokens.
``_admit``: every prompt block allocated, ``context_current_position`` set to device + connector
tokens (``setPrepopulatedPromptLen``), then ``update_state_after_alloc(py_view, block_ids)``
whatever reuse is (``resource_manager.py`` calls it after every ``add_sequence``). An async
load parks the request.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvbm_trtllm.executor.block_hash import block_hashes
from kvbm_trtllm.executor.connector import check_matched_tokens
from kvbm_trtllm.executor.llm_request import LlmRequestState
from kvbm_trtllm.executor.pool import BlockPool
from kvbm_trtllm.executor.profiles import TrtllmProfile
from kvbm_trtllm.executor.request_state import _Request, _State
from kvbm_trtllm.executor.scheduler_output import build_scheduler_output
from kvbm_trtllm.executor.workloads import RequestSpec

__all__ = ["_Plan", "_Scheduling"]


@dataclass
class _Plan:
    """Rank 0's decisions for one iteration, replayed by every other rank."""

    arrived: list[int]
    admitted: list[tuple[int, int, bool]]  # (request id, connector tokens, async)
    scheduled: list[tuple[int, int]]  # (request id, tokens to compute)
    has_meta: bool
    connector_meta: object = None
    paused: list[int] = field(default_factory=list)  # V2: paused for room, in this order


class _Scheduling:
    # Shared with Executor, which sets them.
    pool: BlockPool
    scheduler: Any
    profile: TrtllmProfile
    rank: int
    chunk_size: int | None
    max_batch_size: int
    _new_ids_by_group: Any
    _trim_device_match: Any
    _num_first_blocks: Any
    _report_alloc: Any
    _honour_offer: Any
    attention_dp_rank: int | None
    _admission_blocks: Any
    _make_room: Any
    _pause: Any
    max_num_tokens: int
    _specs: dict[int, RequestSpec]
    _not_arrived: list[RequestSpec]
    _requests: dict[int, _Request]
    _waiting: deque[_Request]
    _active: list[_Request]
    _finished_ids: set[int]
    _new_loading_ids: list[int]
    _iteration: int
    _start: float

    @property
    def tokens_per_block(self) -> int:
        return self.pool.tokens_per_block

    def _plan(self) -> _Plan:
        arrived = self._arrivals()
        self._apply_arrivals(arrived)
        admitted = self._admit_waiting()
        scheduled, paused = self._make_room(self._schedule())
        for rid, n in scheduled:
            self._prepare_step(self._requests[rid], n)
        has_meta = self.scheduler is not None and bool(scheduled or admitted)
        meta = None
        if has_meta:
            admitted_now = {rid: n for rid, n, _ in admitted}
            output = build_scheduler_output(
                scheduled, self._requests, admitted_now, self.profile, self.tokens_per_block,
                self._new_ids_by_group,
            )
            if self.attention_dp_rank is not None:
                output.attention_dp_rank = self.attention_dp_rank
            meta = self.scheduler.build_connector_meta(output)
        return _Plan(arrived, admitted, scheduled, has_meta, meta, paused)

    def _apply_plan(self, plan: _Plan) -> None:
        self._apply_arrivals(plan.arrived)
        for rid, n, is_async in plan.admitted:
            req = self._waiting.popleft()
            if req.request_id != rid:
                raise RuntimeError(
                    f"rank {self.rank} diverged: admits {req.request_id}, rank 0 {rid}"
                )
            self._admit(req, self._device_match(req), n, is_async)
        for rid in plan.paused:
            self._pause(self._requests[rid])
        for rid, n in plan.scheduled:
            self._prepare_step(self._requests[rid], n)

    def _arrivals(self) -> list[int]:
        elapsed = time.perf_counter() - self._start
        return [
            s.request_id
            for s in self._not_arrived
            if self._iteration >= s.arrival_iteration
            and (s.arrival_s is None or elapsed >= s.arrival_s)
            and (s.after is None or s.after in self._finished_ids)
        ]

    def _apply_arrivals(self, arrived: list[int]) -> None:
        ids = set(arrived)
        self._not_arrived = [s for s in self._not_arrived if s.request_id not in ids]
        now = time.perf_counter() - self._start
        for rid in arrived:
            spec = self._specs[rid]
            llm = LlmRequestState.new(
                rid, list(spec.prompt), lora_name=spec.lora_name, cache_salt=spec.cache_salt
            )
            req = _Request(
                spec=spec,
                llm=llm,
                hashes=block_hashes(
                    spec.prompt, self.tokens_per_block, llm.lora_task_id, llm.cache_salt_id
                ),
                arrival_s=now,
                arrival_iteration=self._iteration,
                device_tokens=list(spec.prompt),
            )
            self._requests[rid] = req
            self._waiting.append(req)

    def _reserved_blocks(self) -> int:
        """Blocks promised to admitted requests for tokens they have not reached yet."""
        return sum(self._max_blocks(r) - len(r.block_ids) for r in self._active)

    def _max_blocks(self, req: _Request) -> int:
        return -(-(req.prompt_len + req.spec.max_new_tokens) // self.tokens_per_block)

    def _device_match(self, req: _Request) -> list[int]:
        # At least one prompt token must be computed, so the block holding the last one is never reused.
        max_reusable = (req.prompt_len - 1) // self.tokens_per_block
        return self._trim_device_match(self.pool.match_prefix(req.hashes[:max_reusable]))

    def _admit_waiting(self) -> list[tuple[int, int, bool]]:
        admitted = []
        while self._waiting and len(self._active) < self.max_batch_size:
            req = self._waiting[0]
            matched = self._device_match(req)
            if self.pool.num_allocatable(matched) < self._admission_blocks(req, matched):
                break
            self._waiting.popleft()
            device_hit = len(matched) * self.tokens_per_block
            n, is_async = self._ask_connector(req, device_hit)
            n = self._honour_offer(req, device_hit, n)
            self._admit(req, matched, n, is_async)
            admitted.append((req.request_id, n, is_async))
        return admitted

    def _ask_connector(self, req: _Request, device_hit: int) -> tuple[int, bool]:
        if self.scheduler is None or not self.pool.config.enable_block_reuse:
            return 0, False
        result = self.scheduler.get_num_new_matched_tokens(req.llm.cpp_view, device_hit)
        return check_matched_tokens(result, req.request_id, device_hit, req.prompt_len)

    def _admit(self, req: _Request, matched: list[int], n: int, is_async: bool) -> None:
        req.num_device_hit = len(matched) * self.tokens_per_block
        req.num_connector_hit = n
        req.is_async_load = is_async
        req.num_computed = req.num_device_hit + n
        block_ids = self.pool.allocate(self._num_first_blocks(req), matched)
        if block_ids is None:
            raise RuntimeError(
                f"rank {self.rank}: pool could not supply admitted request {req.request_id}"
            )
        req.block_ids = block_ids
        req.llm.context_current_position = req.num_computed
        req.admitted_iteration = self._iteration
        req.state = _State.LOADING if is_async else _State.CONTEXT
        self._active.append(req)
        if is_async:
            self._new_loading_ids.append(req.request_id)
        self._report_alloc(req, list(block_ids))

    def _schedule(self) -> list[tuple[int, int]]:
        """Generation steps first, then context chunks, within the token budget."""
        scheduled = [(r.request_id, 1) for r in self._active if r.state is _State.GENERATION]
        budget = self.max_num_tokens - len(scheduled)
        for req in self._active:
            if req.state is not _State.CONTEXT:
                continue
            remaining = req.prompt_len - req.num_computed
            if self.chunk_size is None:
                n = remaining if (remaining <= budget or not scheduled) else 0
            else:
                n = min(remaining, self.chunk_size, budget)
            if n > 0:
                scheduled.append((req.request_id, n))
                budget -= n
        return scheduled

    def _prepare_step(self, req: _Request, num_tokens: int) -> None:
        """Allocate the blocks a step writes into: a generation step's (``add_token``), or a
        context chunk's when blocks come per chunk (V2)."""
        if req.state is _State.GENERATION:
            end = len(req.device_tokens)
        elif req.state is _State.CONTEXT:
            end = req.num_computed + num_tokens
        else:
            return
        missing = -(-end // self.tokens_per_block) - len(req.block_ids)
        if missing > 0:
            block_ids = self.pool.allocate(missing)
            if block_ids is None:
                raise RuntimeError(
                    f"rank {self.rank}: reserved blocks for request {req.request_id} missing"
                )
            req.block_ids.extend(block_ids)
