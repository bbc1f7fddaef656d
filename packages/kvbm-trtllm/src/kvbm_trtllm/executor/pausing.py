"""Pause and replay under memory pressure: KVCacheManagerV2's MAX_UTILIZATION (the "v2" profile).

``_Pausing`` is a mixin of ``Executor``. ``KVCacheV2Scheduler`` coerces the capacity policy to
MAX_UTILIZATION (reference landscape §1.5): a request is admitted when its prompt fits now,
with nothing reserved for later chunks or generated tokens, and when a step cannot get its
blocks the youngest running request is paused and later replayed. Operations:
- ``_admission_blocks(req, matched)``: fresh blocks admission needs: the whole sequence less
  the reserved blocks of running requests (V1, GUARANTEED_NO_EVICT), the prompt (V2).
- ``_make_room(scheduled) -> (scheduled, paused_ids)`` (rank 0, V2): while the scheduled steps
  need more fresh blocks than the pool has, pause the youngest running request (context or
  generation; a parked load is never paused) and drop it from the batch; with one running
  request left (parked loads hold the rest), the last steps wait instead.
- ``_pause(req)`` (every rank, in the plan's order): ``request_reset(request)`` on the
  scheduler (DOC: "fires on V2 free_resources rollback or replay"), the request's blocks
  released (its full computed blocks stay matchable, as V2's radix tree keeps them), its
  generated tokens dropped, and it goes back to the front of the queue. Replayed, it is a new
  admission: ``get_num_new_matched_tokens`` is asked again [U], then device and connector
  hits, then computed to the same greedy output.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from kvbm_trtllm.executor.block_hash import block_hashes
from kvbm_trtllm.executor.pool import BlockPool
from kvbm_trtllm.executor.profiles import TrtllmProfile
from kvbm_trtllm.executor.request_state import _Request, _State

__all__ = ["_Pausing"]


class _Pausing:
    # Shared with Executor, which sets them.
    pool: BlockPool
    scheduler: Any
    profile: TrtllmProfile
    _requests: dict[int, _Request]
    _waiting: deque[_Request]
    _active: list[_Request]
    _reserved_blocks: Any
    _max_blocks: Any
    _num_paused: int
    _previous_batch: list[tuple[_Request, int | None]] | None

    @property
    def num_paused(self) -> int:
        """Requests paused for room during the last ``run`` (V2 only)."""
        return self._num_paused

    def _admission_blocks(self, req: _Request, matched: list[int]) -> int:
        if not self.profile.is_kv_cache_manager_v2:
            return self._max_blocks(req) - len(matched) + self._reserved_blocks()
        return -(-req.prompt_len // self.pool.tokens_per_block) - len(matched)

    def _missing_blocks(self, req: _Request, num_tokens: int) -> int:
        end = len(req.device_tokens) if req.state is _State.GENERATION else req.num_computed + num_tokens
        return max(0, -(-end // self.pool.tokens_per_block) - len(req.block_ids))

    def _make_room(self, scheduled: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
        paused: list[int] = []
        if not self.profile.is_kv_cache_manager_v2:
            return scheduled, paused
        while True:
            need = sum(self._missing_blocks(self._requests[rid], n) for rid, n in scheduled)
            if need <= self.pool.num_allocatable(()):
                return scheduled, paused
            victims = [r for r in self._active if r.state in (_State.CONTEXT, _State.GENERATION)]
            if len(victims) <= 1:
                # Parked loads hold the rest: the steps that do not fit wait for them.
                return scheduled[:-1], paused
            victim = victims[-1]
            self._pause(victim)
            paused.append(victim.request_id)
            scheduled = [(rid, n) for rid, n in scheduled if rid != victim.request_id]

    def _pause(self, req: _Request) -> None:
        if self.scheduler is not None:
            self.scheduler.request_reset(req.llm.py_view)
        self._active.remove(req)
        if self._previous_batch:
            # Its token sampled last iteration (overlap scheduler) belongs to the abandoned run.
            self._previous_batch = [(r, t) for r, t in self._previous_batch if r is not req]
        self.pool.release(req.block_ids)
        prompt = list(req.spec.prompt)
        req.llm.tokens[:] = prompt
        req.llm.context_current_position = 0
        req.device_tokens = list(prompt)
        req.hashes = block_hashes(
            prompt, self.pool.tokens_per_block, req.llm.lora_task_id, req.llm.cache_salt_id
        )
        req.block_ids = []
        req.state = _State.CONTEXT
        req.num_computed = req.num_device_hit = req.num_connector_hit = 0
        req.is_async_load = req.is_reported = False
        req.num_reported_tokens = req.num_reported_blocks = req.num_committed_blocks = 0
        req.first_token_s = None
        req.first_token_iteration = -1
        self._num_paused += 1
        self._waiting.appendleft(req)
