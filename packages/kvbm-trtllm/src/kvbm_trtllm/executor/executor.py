"""The reference executor's loop: TensorRT-LLM's PyExecutor call order around a paged model.

``Executor(model_config, pool_config, connector=None, *, overlap, chunk_size, ...)`` builds, in
this order (as ``create_py_executor`` / ``PyExecutor.__init__`` do): the connector worker on
every rank and the scheduler on rank 0 (two threads), ``register_forward_pass_callable``, the
block pool, ``register_kv_caches(pool.tensor)`` once, the model.

``run(workload) -> RunResult`` may be called again: the pool's cached blocks and the connector's
state carry over (use fresh request ids, as TensorRT-LLM does). Each iteration:
1. Rank 0 plans: arrivals; admission (FIFO, GUARANTEED_NO_EVICT: a request is admitted only
   when the pool can hold its whole sequence) with device prefix match,
   ``get_num_new_matched_tokens(req, device_hit)`` once per request (checked:
   ``n + device_hit < prompt_len``, never ``(0, True)``), allocation of every prompt block,
   ``update_state_after_alloc(req, block_ids)``; an async load parks the request; context
   chunks and generation steps are scheduled; the ``SchedulerOutput`` delta is built (first
   appearance: whole prompt, all prompt blocks, ``computed_position`` without tokens the
   connector matched this iteration) and ``build_connector_meta`` called. The plan goes to every
   rank (``broadcast_object``; pickled even at TP=1) and each worker binds the metadata.
2. ``start_load_kv(stream)``; per layer ``wait_for_layer_load`` / layer / ``save_kv_layer``; the
   forward-pass callable; ``wait_for_save(stream)``.
3. Results are processed (with ``overlap``, the previous iteration's, one iteration late);
   each finished request gets ``request_finished(req, all_block_ids)`` on rank 0 (broadcast),
   and keeps its blocks while that returned True.
4. ``get_finished(new_saving_ids, new_loading_ids)`` on every rank, every iteration, each id
   passed once; an id counts as done once every rank has returned it; an id never passed in
   raises ``KeyError``. Only returned ids are freed / un-parked.

Tokens ``[device_hit, device_hit + n)`` matched by the connector are treated as already in the
pool (the connector writes them); only the rest of the prompt is computed. ``stream`` is
``torch.cuda.current_stream()`` on a GPU and ``None`` on the CPU.
"""

from __future__ import annotations

import pickle
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvbm_core.hashing import block_hashes, salt_hash
from kvbm_trtllm.executor.connector import (
    ConnectorContractError,
    ConnectorSpec,
    build_connector,
    check_finished,
    check_matched_tokens,
    resolve_connector,
)
from kvbm_trtllm.executor.distributed import Comm, LocalComm
from kvbm_trtllm.executor.model import ModelConfig, ReferenceModel, SequenceChunk
from kvbm_trtllm.executor.pool import BlockPool, PoolConfig
from kvbm_trtllm.executor.request_state import _Request, _State
from kvbm_trtllm.executor.results import IterationStats, RequestResult, RunResult
from kvbm_trtllm.executor.workloads import Workload
from kvbm_trtllm.trtllm_api import (
    KvCacheConfigLike,
    KvCacheConnectorConfigLike,
    LlmArgsLike,
    LlmRequestLike,
    RequestData,
    SchedulerOutput,
)

__all__ = ["Executor", "ConnectorContractError", "ConnectorSpec", "resolve_connector"]

# ConnectorContractError, ConnectorSpec and resolve_connector live in connector.py; they stay
# importable from here, where they were first defined.


@dataclass
class _Plan:
    """Rank 0's decisions for one iteration, replayed by every other rank."""

    arrived: list[int]
    admitted: list[tuple[int, int, bool]]  # (request id, connector tokens, async)
    scheduled: list[tuple[int, int]]  # (request id, tokens to compute)
    has_meta: bool
    connector_meta: object = None


class Executor:
    def __init__(
        self,
        model_config: ModelConfig,
        pool_config: PoolConfig,
        connector: ConnectorSpec | None = None,
        *,
        overlap: bool = False,
        chunk_size: int | None = None,
        max_batch_size: int = 64,
        max_num_tokens: int = 8192,
        llm_args: LlmArgsLike | None = None,
        comm: Comm | None = None,
        device: str | None = None,
        max_iterations: int = 1_000_000,
    ):
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        self.model_config = model_config
        self.pool_config = pool_config
        self.overlap = overlap
        self.chunk_size = chunk_size
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_iterations = max_iterations
        self.comm = comm or LocalComm()
        self.rank = self.comm.rank
        self.tp_size = self.comm.world_size
        self.llm_args = self._llm_args(llm_args, connector)
        self.scheduler, self.worker = build_connector(connector, self.llm_args, self.rank)
        self._forward_callable: Callable[[], Any] | None = None
        self.num_load_error_tokens = 0
        if self.worker is not None:
            self._forward_callable = self.worker.register_forward_pass_callable() or None
        self.model = ReferenceModel(model_config, self.comm, device=device)
        self.pool = BlockPool(
            pool_config,
            num_layers=model_config.num_layers,
            num_kv_heads=self.model.num_local_kv_heads,
            head_dim=model_config.head_dim,
            dtype=model_config.torch_dtype,
            device=self.model.device,
        )
        if self.worker is not None:
            self.worker.register_kv_caches(self.pool.tensor)
        self._salt = salt_hash(model_config.name)

    def close(self) -> None:
        """Shut down the connector's parts that have a ``shutdown()`` (engines do so at exit)."""
        for part in (self.scheduler, self.worker):
            shutdown = getattr(part, "shutdown", None)
            if callable(shutdown):
                shutdown()

    @property
    def tokens_per_block(self) -> int:
        return self.pool_config.tokens_per_block

    @property
    def kv_cache_tensor(self) -> torch.Tensor:
        return self.pool.tensor

    def _llm_args(self, given: LlmArgsLike | None, connector: ConnectorSpec | None) -> LlmArgsLike:
        """``given`` (or a default) with the model facts a connector needs in ``extra``."""
        t = self.pool_config.tokens_per_block
        args = given or LlmArgsLike(
            model=self.model_config.name,
            kv_cache_config=KvCacheConfigLike(tokens_per_block=t),
            tensor_parallel_size=self.tp_size,
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            enable_chunked_prefill=self.chunk_size is not None,
            kv_connector_config=connector
            if isinstance(connector, KvCacheConnectorConfigLike)
            else None,
        )
        if args.kv_cache_config.tokens_per_block != t:
            raise ValueError(
                f"llm_args.kv_cache_config.tokens_per_block={args.kv_cache_config.tokens_per_block} "
                f"differs from PoolConfig.tokens_per_block={t}; make them equal"
            )
        if args.tensor_parallel_size != self.tp_size:
            raise ValueError(
                f"llm_args.tensor_parallel_size={args.tensor_parallel_size} but the executor runs "
                f"{self.tp_size} rank(s); make them equal"
            )
        c = self.model_config
        model_facts = {
            "head_dim": c.head_dim,
            "num_layers": c.num_layers,
            "num_kv_heads": c.num_kv_heads,
            "dtype": c.dtype,
        }
        return replace(args, extra={**model_facts, **args.extra})

    # ---- run -------------------------------------------------------------------------------

    def run(self, workload: Workload) -> RunResult:
        self._check_workload(workload)
        self._specs = {r.request_id: r for r in workload.requests}
        self._not_arrived = list(workload.requests)
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._active: list[
            _Request
        ] = []  # admitted, in admission order (context/generation/loading)
        self._finished_ids: set[int] = set()
        self._new_saving_ids: list[int] = []
        self._new_loading_ids: list[int] = []
        self._pending_done: dict[int, set[int]] = {}  # id -> ranks that reported it done
        self._previous_batch: list[tuple[_Request, int | None]] | None = None
        self._iteration = 0
        self._iterations: list[IterationStats] = []
        self._start = time.perf_counter()
        while len(self._finished_ids) < len(workload.requests) or self._busy():
            if self._iteration >= self.max_iterations:
                raise RuntimeError(self._stuck_message())
            self._step()
            self._iteration += 1
        return self._result()

    def _busy(self) -> bool:
        return any(r.state is not _State.DONE for r in self._requests.values())

    def _check_workload(self, workload: Workload) -> None:
        t = self.tokens_per_block
        for r in workload.requests:
            bad = [x for x in r.prompt if not 0 <= x < self.model_config.vocab_size]
            if bad:
                raise ValueError(
                    f"request {r.request_id}: token {bad[0]} outside the model's vocabulary "
                    f"[0, {self.model_config.vocab_size})"
                )
            need = -(-(len(r.prompt) + r.max_new_tokens) // t)
            if need > self.pool.num_blocks:
                raise ValueError(
                    f"request {r.request_id} needs {need} blocks of {t} tokens but the pool has "
                    f"{self.pool.num_blocks}; raise PoolConfig.num_blocks"
                )

    def _stuck_message(self) -> str:
        states = {
            rid: r.state.value for rid, r in self._requests.items() if r.state is not _State.DONE
        }
        return (
            f"no completion after {self.max_iterations} iterations; unfinished requests: {states} "
            f"(a connector that never reports a load or save in get_finished stalls them)"
        )

    # ---- one iteration -------------------------------------------------------------------------

    def _step(self) -> None:
        started = time.perf_counter()
        plan = self._plan() if self.rank == 0 else None
        plan = self._share_plan(plan)
        if self.rank != 0:
            self._apply_plan(plan)
        batch = [(self._requests[rid], n) for rid, n in plan.scheduled]
        num_context = sum(1 for req, _ in batch if req.state is _State.CONTEXT)
        stream = torch.cuda.current_stream() if self.model.device.type == "cuda" else None
        if self.worker is not None and plan.has_meta:
            self.worker.bind_connector_meta(plan.connector_meta)
            self.worker.start_load_kv(stream)
        if self.worker is not None:
            self._recover_failed_loads()
        sampled = self._forward(batch, stream) if batch else {}
        outputs = [(req, sampled.get(req.request_id)) for req, _ in batch]
        if self.overlap:
            to_process, self._previous_batch = self._previous_batch, outputs
        else:
            to_process = outputs
        finished = self._process_outputs(to_process or [])
        self._finish_requests(finished)
        if self.worker is not None:
            self._get_finished()
        if not batch:
            self._idle_wait()
        self._record_iteration(started, batch, num_context)

    def _share_plan(self, plan: _Plan | None) -> _Plan:
        if self.tp_size > 1:
            return self.comm.broadcast_object(plan)
        # Metadata crosses a process boundary in TensorRT-LLM; make pickling bugs show at TP=1.
        return pickle.loads(pickle.dumps(plan))

    def _idle_wait(self) -> None:
        if self.rank == 0 and not self._active and self._not_arrived:
            next_s = min(
                (r.arrival_s for r in self._not_arrived if r.arrival_s is not None), default=None
            )
            if next_s is not None:
                delay = next_s - (time.perf_counter() - self._start)
                time.sleep(min(max(delay, 0.0), 0.05))
                return
        if any(r.state in (_State.LOADING, _State.SAVING) for r in self._requests.values()):
            time.sleep(0.0005)  # let a connector's background transfers progress

    # ---- planning (rank 0) ---------------------------------------------------------------------

    def _plan(self) -> _Plan:
        arrived = self._arrivals()
        self._apply_arrivals(arrived)
        admitted = self._admit_waiting()
        scheduled = self._schedule()
        for rid, _ in scheduled:
            self._prepare_step(self._requests[rid])
        has_meta = self.scheduler is not None and bool(scheduled or admitted)
        meta = None
        if has_meta:
            admitted_now = {rid: (n, is_async) for rid, n, is_async in admitted}
            meta = self.scheduler.build_connector_meta(
                self._scheduler_output(scheduled, admitted_now)
            )
        return _Plan(arrived, admitted, scheduled, has_meta, meta)

    def _apply_plan(self, plan: _Plan) -> None:
        self._apply_arrivals(plan.arrived)
        for rid, n, is_async in plan.admitted:
            req = self._waiting.popleft()
            if req.request_id != rid:
                raise RuntimeError(
                    f"rank {self.rank} diverged: admits {req.request_id}, rank 0 {rid}"
                )
            self._admit(req, self._device_match(req), n, is_async)
        for rid, _ in plan.scheduled:
            self._prepare_step(self._requests[rid])

    def _arrivals(self) -> list[int]:
        elapsed = time.perf_counter() - self._start
        arrived = [
            s.request_id
            for s in self._not_arrived
            if self._iteration >= s.arrival_iteration
            and (s.arrival_s is None or elapsed >= s.arrival_s)
            and (s.after is None or s.after in self._finished_ids)
        ]
        return arrived

    def _apply_arrivals(self, arrived: list[int]) -> None:
        ids = set(arrived)
        self._not_arrived = [s for s in self._not_arrived if s.request_id not in ids]
        now = time.perf_counter() - self._start
        for rid in arrived:
            spec = self._specs[rid]
            llm = LlmRequestLike(
                rid, list(spec.prompt), lora_name=spec.lora_name, cache_salt=spec.cache_salt
            )
            salt = salt_hash(self.model_config.name, spec.lora_name, spec.cache_salt)
            req = _Request(
                spec=spec,
                llm=llm,
                hashes=block_hashes(spec.prompt, self.tokens_per_block, salt),
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
        # +1 position: under overlap a finished request runs one extra step.
        return -(-(req.prompt_len + req.spec.max_new_tokens) // self.tokens_per_block)

    def _device_match(self, req: _Request) -> list[int]:
        # At least one prompt token must be computed, so the block holding the last one is never reused.
        max_reusable = (req.prompt_len - 1) // self.tokens_per_block
        return self.pool.match_prefix(req.hashes[:max_reusable])

    def _admit_waiting(self) -> list[tuple[int, int, bool]]:
        admitted = []
        while self._waiting and len(self._active) < self.max_batch_size:
            req = self._waiting[0]
            matched = self._device_match(req)
            needed = self._max_blocks(req) - len(matched)
            if self.pool.num_allocatable(matched) - self._reserved_blocks() < needed:
                break
            self._waiting.popleft()
            device_hit = len(matched) * self.tokens_per_block
            n, is_async = self._ask_connector(req, device_hit)
            self._admit(req, matched, n, is_async)
            admitted.append((req.request_id, n, is_async))
        return admitted

    def _ask_connector(self, req: _Request, device_hit: int) -> tuple[int, bool]:
        if self.scheduler is None:
            return 0, False
        result = self.scheduler.get_num_new_matched_tokens(req.llm, device_hit)
        return check_matched_tokens(result, req.request_id, device_hit, req.prompt_len)

    def _admit(self, req: _Request, matched: list[int], n: int, is_async: bool) -> None:
        num_prompt_blocks = -(-req.prompt_len // self.tokens_per_block)
        block_ids = self.pool.allocate(num_prompt_blocks, matched)
        if block_ids is None:
            raise RuntimeError(
                f"rank {self.rank}: pool could not supply admitted request {req.request_id}"
            )
        req.block_ids = block_ids
        req.num_device_hit = len(matched) * self.tokens_per_block
        req.num_connector_hit = n
        req.is_async_load = is_async
        req.num_computed = req.num_device_hit + n
        req.llm.context_current_position = req.num_computed
        req.admitted_iteration = self._iteration
        req.state = _State.LOADING if is_async else _State.CONTEXT
        self._active.append(req)
        if is_async:
            self._new_loading_ids.append(req.request_id)
        if self.scheduler is not None:
            self.scheduler.update_state_after_alloc(req.llm, list(block_ids))

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

    def _prepare_step(self, req: _Request) -> None:
        """Allocate the block a generation step writes into (``add_token``)."""
        if req.state is not _State.GENERATION:
            return
        position = len(req.device_tokens) - 1
        if position // self.tokens_per_block >= len(req.block_ids):
            block_ids = self.pool.allocate(1)
            if block_ids is None:
                raise RuntimeError(
                    f"rank {self.rank}: reserved block for request {req.request_id} missing"
                )
            req.block_ids.extend(block_ids)

    def _scheduler_output(
        self, scheduled: list[tuple[int, int]], admitted_now: dict[int, tuple[int, bool]]
    ) -> SchedulerOutput:
        out = SchedulerOutput(new_requests=[], cached_requests=[])
        for rid, num_tokens in scheduled:
            req = self._requests[rid]
            tokens = req.llm.get_tokens(0)
            if req.state is _State.CONTEXT:
                computed = req.num_computed
                if not req.is_reported and rid in admitted_now:
                    computed -= admitted_now[rid][0]
            else:
                computed = len(tokens) - 1
            data = RequestData(
                request_id=rid,
                new_tokens=tokens[req.num_reported_tokens :],
                new_block_ids=req.block_ids[req.num_reported_blocks :],
                computed_position=computed,
                num_scheduled_tokens=num_tokens,
            )
            (out.cached_requests if req.is_reported else out.new_requests).append(data)
            req.is_reported = True
            req.num_reported_tokens = len(tokens)
            req.num_reported_blocks = len(req.block_ids)
        return out

    # ---- forward ---------------------------------------------------------------------------------

    def _forward(self, batch: list[tuple[_Request, int]], stream: Any) -> dict[int, int]:
        chunks = []
        for req, n in batch:
            start = req.num_computed
            chunks.append(
                SequenceChunk(
                    token_ids=req.device_tokens[start : start + n],
                    start_pos=start,
                    block_ids=req.block_ids,
                    needs_logits=start + n >= req.prompt_len,
                )
            )
        worker = self.worker
        tokens = self.model.forward(
            chunks,
            self.pool,
            on_layer_start=(lambda i: worker.wait_for_layer_load(i, stream)) if worker else None,
            on_layer_end=(lambda i: worker.save_kv_layer(i, stream)) if worker else None,
        )
        if self._forward_callable is not None:
            self._forward_callable()
        if worker is not None:
            worker.wait_for_save(stream)
        sampled = {}
        token_iter = iter(tokens)
        for (req, n), chunk in zip(batch, chunks, strict=True):
            req.num_computed += n
            if req.state is _State.CONTEXT:
                req.llm.context_current_position = min(req.num_computed, req.prompt_len)
            self._commit_blocks(req)
            if chunk.needs_logits:
                token = next(token_iter)
                sampled[req.request_id] = token
                req.device_tokens.append(token)
                req.state = _State.GENERATION
        return sampled

    def _commit_blocks(self, req: _Request) -> None:
        """Make full blocks whose KV is complete matchable by later requests."""
        num_full = min(req.num_computed, len(req.device_tokens)) // self.tokens_per_block
        if num_full <= req.num_committed_blocks:
            return
        if num_full > len(req.hashes):
            salt = salt_hash(self.model_config.name, req.spec.lora_name, req.spec.cache_salt)
            req.hashes = block_hashes(
                req.device_tokens[: num_full * self.tokens_per_block], self.tokens_per_block, salt
            )
        for i in range(req.num_committed_blocks, num_full):
            self.pool.commit(req.block_ids[i], req.hashes[i])
        req.num_committed_blocks = num_full

    # ---- after the forward -----------------------------------------------------------------------

    def _process_outputs(self, outputs: list[tuple[_Request, int | None]]) -> list[_Request]:
        """Make sampled tokens visible to the host; return requests that just finished."""
        now = time.perf_counter() - self._start
        finished = []
        for req, token in outputs:
            if token is None or req.state not in (_State.GENERATION,):
                continue
            req.llm.add_new_token(token)
            if req.first_token_s is None:
                req.first_token_s = now
                req.first_token_iteration = self._iteration
            if req.num_generated >= req.spec.max_new_tokens:
                finished.append(req)
        return finished

    def _finish_requests(self, finished: list[_Request]) -> None:
        if not finished:
            return
        holds = [False] * len(finished)
        if self.scheduler is not None:
            holds = [
                bool(self.scheduler.request_finished(req.llm, list(req.block_ids)))
                for req in finished
            ]
        if self.worker is not None and self.tp_size > 1:
            holds = self.comm.broadcast_object(holds)
        now = time.perf_counter() - self._start
        for req, hold in zip(finished, holds, strict=True):
            self._active.remove(req)
            req.finish_s = now
            req.finished_iteration = self._iteration
            self._finished_ids.add(req.request_id)
            self._commit_blocks(req)
            if hold:
                req.state = _State.SAVING
                self._new_saving_ids.append(req.request_id)
            else:
                self._free(req)

    def _free(self, req: _Request) -> None:
        self.pool.release(req.block_ids)
        req.state = _State.DONE

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
        completed = []
        for rank, (saved, loaded) in enumerate(reports):
            for rid in saved + loaded:
                ranks = self._pending_done[rid]
                ranks.add(rank)
                if len(ranks) == self.tp_size:
                    completed.append(rid)
        for rid in completed:
            del self._pending_done[rid]
            req = self._requests[rid]
            if req.state is _State.SAVING:
                self._free(req)
            else:
                req.state = _State.CONTEXT
        if completed:
            self._recover_failed_loads()  # before the next plan schedules the loaded requests

    def _recover_failed_loads(self) -> None:
        """Recompute from the first block a connector failed to load (vLLM's recovery contract).

        Every rank takes the union of all ranks' failed GPU blocks, so all rewind alike.
        """
        take = getattr(self.worker, "get_block_ids_with_load_errors", None)
        if take is None:
            return
        failed = set(take() or ())
        if self.tp_size > 1:
            failed = set().union(*self.comm.all_gather_object(failed))
        if not failed:
            return
        t = self.tokens_per_block
        for req in self._active:
            if req.state not in (_State.CONTEXT, _State.LOADING):
                continue
            first, end = req.num_device_hit // t, (req.num_device_hit + req.num_connector_hit) // t
            bad = [i for i in range(first, end) if req.block_ids[i] in failed]
            if bad and req.num_computed > bad[0] * t:
                self.num_load_error_tokens += req.num_computed - bad[0] * t
                req.num_computed = bad[0] * t
                req.llm.context_current_position = req.num_computed

    def _check_finished_ids(self, ids: list[int], state: _State) -> None:
        for rid in ids:
            req = self._requests.get(rid)
            if req is None or req.state is not state or rid not in self._pending_done:
                raise KeyError(
                    f"get_finished returned request id {rid} as finished "
                    f"{'saving' if state is _State.SAVING else 'loading'}, but it was never passed "
                    f"in as such or was already completed"
                )

    # ---- results -------------------------------------------------------------------------------

    def _record_iteration(
        self, started: float, batch: list[tuple[_Request, int]], num_context: int
    ) -> None:
        context_tokens = sum(n for r, n in batch[len(batch) - num_context :])
        self._iterations.append(
            IterationStats(
                iteration=self._iteration,
                wall_s=time.perf_counter() - started,
                num_context_requests=num_context,
                num_context_tokens=context_tokens,
                num_generation_requests=len(batch) - num_context,
                num_waiting=len(self._waiting),
                num_loading=sum(1 for r in self._active if r.state is _State.LOADING),
                num_saving=sum(1 for r in self._requests.values() if r.state is _State.SAVING),
                num_free_blocks=self.pool.num_free_blocks,
                num_cached_blocks=self.pool.num_cached_blocks,
            )
        )

    def _result(self) -> RunResult:
        requests = {}
        for rid, req in sorted(self._requests.items()):
            tokens = req.llm.get_tokens(0)[req.prompt_len :]
            requests[rid] = RequestResult(
                request_id=rid,
                prompt_len=req.prompt_len,
                output_tokens=tuple(tokens),
                num_device_hit_tokens=req.num_device_hit,
                num_connector_hit_tokens=req.num_connector_hit,
                is_async_load=req.is_async_load,
                arrival_s=req.arrival_s,
                first_token_s=req.first_token_s if req.first_token_s is not None else float("nan"),
                finish_s=req.finish_s,
                arrival_iteration=req.arrival_iteration,
                admitted_iteration=req.admitted_iteration,
                first_token_iteration=req.first_token_iteration,
                finished_iteration=req.finished_iteration,
            )
        return RunResult(
            requests=requests,
            iterations=self._iterations,
            wall_s=time.perf_counter() - self._start,
            num_evicted_blocks=self.pool.num_evicted_blocks,
        )
