"""The end of a request's life: finishing, async saves and loads, and failing it.

``_Completion`` is a mixin of ``Executor``. Operations:
- ``_finish_requests(finished)``: ``request_finished(py_view, all_block_ids)`` on rank 0
  (broadcast); a True answer holds the blocks (state SAVING) until ``get_finished`` returns the
  id, else they are freed now.
- ``_get_finished()``: ``get_finished(new_saving_ids, new_loading_ids)`` on every rank, each id
  passed once; an id is done once every rank returned it; an unknown id raises ``KeyError``.
  A finished load is un-parked as PE does (state back to CONTEXT_INIT) and scheduled from
  ``request.context_current_position``: the connector may have rewound it to have blocks whose
  load failed recomputed. The position must be ``0 <= pos <= promised`` (device + connector
  tokens) and the same on every rank, else ``ConnectorContractError``; from there on the
  forward rewrites every block.
- ``_handle_load_errors()`` (profile ``"main+load-errors"`` only): PR #15425's
  ``KvCacheConnectorManager.handle_load_errors(requests, kv_cache_manager)`` calls
  ``worker.get_block_ids_with_load_errors()`` once (the PR's ABC default returns ``[]``; a worker
  without the method counts as that), picks the requests whose ``get_cache_indices`` hold a
  failed block, and the executor fails them with "KV cache load failure" (the PR's integration
  test: ``pytest.raises(Exception, match="KV cache load failure")``). Where PE calls it in the
  loop is not in the stored copies [U]: here once per iteration, after ``get_finished``, over
  the active requests; under TP the failed blocks of all ranks are united [U].
- ``_handle_errors(message, requests=None)``: PE's ``_handle_errors``; ``None`` means every
  active request (PE: ``failed_requests = list(self.active_requests)``), which in TensorRT-LLM
  includes requests fetched but not yet scheduled and parked loads; a request already saving
  was terminated before and is not touched. Each failed request gets ``error``, its blocks are
  freed (even under a load still in flight, as ``_terminate_request`` would [U]) and
  ``request_finished`` is not called for it [U]. A later ``get_finished`` report of its id is
  dropped.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from kvbm_trtllm.executor.connector import ConnectorContractError, check_finished
from kvbm_trtllm.executor.distributed import Comm
from kvbm_trtllm.executor.pool import BlockPool
from kvbm_trtllm.executor.request_state import _Request, _State

__all__ = ["_Completion", "LOAD_FAILURE_MESSAGE"]

LOAD_FAILURE_MESSAGE = "KV cache load failure"  # PR #15425's _handle_errors message


class _Completion:
    # Shared with Executor, which sets them.
    pool: BlockPool
    scheduler: Any
    worker: Any
    comm: Comm
    tp_size: int
    _requests: dict[int, _Request]
    _waiting: deque[_Request]
    _active: list[_Request]
    _finished_ids: set[int]
    _new_saving_ids: list[int]
    _new_loading_ids: list[int]
    _pending_done: dict[int, set[int]]
    _report_finished: Any  # _KvCacheManagerCalls's
    _iteration: int
    _start: float

    # ---- finishing -------------------------------------------------------------------------

    def _finish_requests(self, finished: list[_Request]) -> None:
        if not finished:
            return
        holds = [self._report_finished(req) for req in finished]
        if self.worker is not None and self.tp_size > 1:
            holds = self.comm.broadcast_object(holds)
        for req, hold in zip(finished, holds, strict=True):
            self._active.remove(req)
            self._mark_finished(req)
            self._commit_blocks(req)
            if hold:
                req.state = _State.SAVING
                self._new_saving_ids.append(req.request_id)
            else:
                self._free(req)

    def _commit_blocks(self, req: _Request) -> None:
        raise NotImplementedError  # Executor's'

    def _mark_finished(self, req: _Request) -> None:
        req.finish_s = time.perf_counter() - self._start
        req.finished_iteration = self._iteration
        self._finished_ids.add(req.request_id)

    def _free(self, req: _Request) -> None:
        self.pool.release(req.block_ids)
        req.state = _State.DONE

    # ---- get_finished ----------------------------------------------------------------------

    def _get_finished(self) -> None:
        saving_ids, loading_ids = self._new_saving_ids, self._new_loading_ids
        self._new_saving_ids, self._new_loading_ids = [], []
        for rid in saving_ids + loading_ids:
            self._pending_done[rid] = set()
        done_saving, done_loading = check_finished(
            self.worker.get_finished(saving_ids, loading_ids)
        )
        self._check_finished_ids(done_saving, _State.SAVING)
        self._check_finished_ids(done_loading, _State.LOADING)
        reports = self.comm.all_gather_object((done_saving, done_loading))
        loaded = []
        for rid in self._completed_on_all_ranks(reports):
            req = self._requests[rid]
            if req.error is not None:
                continue  # failed while its transfer was pending
            if req.state is _State.SAVING:
                self._free(req)
            else:
                loaded.append(req)
        if loaded:
            self._unpark(loaded)

    def _completed_on_all_ranks(self, reports: list[tuple[list[int], list[int]]]) -> list[int]:
        completed = []
        for rank, (saved, loaded) in enumerate(reports):
            for rid in saved + loaded:
                ranks = self._pending_done[rid]
                ranks.add(rank)
                if len(ranks) == self.tp_size:
                    completed.append(rid)
        for rid in completed:
            del self._pending_done[rid]
        return completed

    def _check_finished_ids(self, ids: list[int], state: _State) -> None:
        for rid in ids:
            req = self._requests.get(rid)
            known = req is not None and (req.state is state or req.error is not None)
            if not known or rid not in self._pending_done:
                raise KeyError(
                    f"get_finished returned request id {rid} as finished "
                    f"{'saving' if state is _State.SAVING else 'loading'}, but it was never passed "
                    f"in as such or was already completed"
                )

    def _unpark(self, loaded: list[_Request]) -> None:
        """PE: state back to CONTEXT_INIT, scheduled from ``context_current_position``."""
        positions = [self._read_back_position(req) for req in loaded]
        if self.tp_size > 1:
            per_rank = self.comm.all_gather_object(positions)
            if any(p != positions for p in per_rank):
                raise ConnectorContractError(
                    f"context_current_position of un-parked requests "
                    f"{[r.request_id for r in loaded]} differs between ranks: {per_rank}; "
                    f"TensorRT-LLM's ranks would schedule different tokens and desynchronize"
                )
        for req, position in zip(loaded, positions, strict=True):
            if position < req.num_computed:
                req.num_connector_hit = max(0, position - req.num_device_hit)
                req.num_device_hit = min(req.num_device_hit, position)
            req.num_computed = position
            req.state = _State.CONTEXT

    def _read_back_position(self, req: _Request) -> int:
        position = req.llm.context_current_position
        if not isinstance(position, int) or not 0 <= position <= req.num_computed:
            raise ConnectorContractError(
                f"request {req.request_id}: context_current_position {position!r} after its "
                f"load finished; it must be an int in [0, {req.num_computed}] (the tokens "
                f"promised by the device match and the connector)"
            )
        return position

    # ---- failures --------------------------------------------------------------------------

    def _handle_load_errors(self) -> None:
        take = getattr(self.worker, "get_block_ids_with_load_errors", None)
        failed = set(take() or ()) if take is not None else set()
        if self.tp_size > 1:
            failed = set().union(*self.comm.all_gather_object(failed))
        if not failed:
            return
        affected = [req for req in self._active if failed.intersection(req.block_ids)]
        if affected:
            self._handle_errors(LOAD_FAILURE_MESSAGE, affected)

    def _handle_errors(self, message: str, requests: list[_Request] | None = None) -> None:
        if requests is None:
            requests = list(self._active) + list(self._waiting)
        for req in requests:
            self._fail(req, message)

    def _fail(self, req: _Request, message: str) -> None:
        req.error = message
        if req in self._active:
            self._active.remove(req)
            self.pool.release(req.block_ids)
        else:
            self._waiting.remove(req)
        req.state = _State.DONE
        self._mark_finished(req)
