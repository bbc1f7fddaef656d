"""The reference executor's loop: TensorRT-LLM's PyExecutor call order around a paged model.

It imitates TensorRT-LLM, never kvbm: attributes, calls, defaults and missing features are
TensorRT-LLM's for the chosen version. Sources: PE = ``_torch/pyexecutor/py_executor.py``
@00043967, KC = ``_torch/pyexecutor/connectors/kv_cache_connector.py``@035ab91c; [U] marks
what the sources left uncertain.

``Executor(model_config, pool_config, connector=None, *, trtllm_version="main", overlap=True,
cuda_graph_config=CudaGraphConfigLike(), chunk_size=None, ...)``. ``trtllm_version`` picks a
profile (``profiles.py``): ``"1.2"`` (five-field ``RequestData``), ``"main"`` (the default:
newest main with the V1 KV cache manager; ``RequestData`` with ``block_hashes``, ``priorities``,
``cache_salt``, ``new_block_ids_by_layer_group``) or ``"main+load-errors"`` (main plus the closed
PR #15425's load-error API) or ``"v2"`` (KVCacheManagerV2: layouts, layer groups, per-chunk
allocation, pause and replay; ``v2.py``, ``pausing.py``, ``layer_groups.py``; with
``honour_offer`` for partial honour and ``attention_dp_rank`` for attention DP,
``attention_dp.py``). "main" stays the default: V2's per-chunk allocation and empty block hashes
change what many existing tests assert. Defaults are TensorRT-LLM's: the overlap scheduler on
(``disable_overlap_scheduler=False``), CUDA graphs for generation-only batches on
(``cuda_graph_config`` defaults to ``CudaGraphConfig()``), block reuse on. ``overlap=False`` and
``cuda_graph_config=None`` turn them off.

Construction, as ``create_py_executor`` / ``PyExecutor.__init__``: the connector worker on every
rank and the scheduler on rank 0 (two threads), ``register_forward_pass_callable``, the block
pool, ``register_kv_caches(pool.tensor)`` once, the model.

``run(workload) -> RunResult`` may be called again: the pool's cached blocks and the connector's
state carry over (use fresh request ids, as TensorRT-LLM does). Each iteration:
1. Rank 0 plans (``scheduling.py``): arrivals; admission (FIFO, GUARANTEED_NO_EVICT) with device
   prefix match; with block reuse on, ``get_num_new_matched_tokens(request, device_hit)`` once per
   request on the C++ base view (``llm_request.CppLlmRequest``); with it off, never (0 external
   tokens); every prompt block allocated; ``update_state_after_alloc(request, block_ids)`` on
   the Python view (``PyLlmRequest``); an async load parks the request; the batch; the
   ``SchedulerOutput`` of the profile's shape (``scheduler_output.py``) and
   ``build_connector_meta``. The plan goes to every rank (pickled even at TP=1) and each worker
   binds the metadata.
2. ``start_load_kv(stream)``.
3. The forward step: per layer ``wait_for_layer_load`` / layer / ``save_kv_layer``, the
   forward-pass callable, ``wait_for_save(stream)``. Under CUDA graphs (``cuda_graphs.py``) a
   generation-only batch of a graphed size fires the layer hooks only when its graph is captured
   (first batch of that size), never on replay; the callable and ``wait_for_save`` always run.
4. Results are processed (with ``overlap``, the previous iteration's, one iteration late); each
   finished request gets ``request_finished(request, all_block_ids)`` on rank 0 (broadcast) and
   keeps its blocks while that returned True.
5. ``get_finished(new_saving_ids, new_loading_ids)`` on every rank, every iteration, each id
   passed once; an id counts as done once every rank returned it; an id never passed in raises
   ``KeyError``. A finished load is un-parked from ``request.context_current_position``, which
   the connector may have rewound (``completion.py``).
6. Only on ``"main+load-errors"``: ``get_block_ids_with_load_errors()``; requests holding a
   failed block fail with "KV cache load failure". On "1.2" and "main" it is never called.

Errors (PE): an exception inside the forward step (a layer hook, the callable,
``wait_for_save``, the model) is caught as ``_forward_step`` does and ``_handle_errors`` fails
every active request (its ``RequestResult.error`` is set, its blocks freed); the run goes on.
PE's overlap loop would then hit ``assert sample_state is not None`` [U]; the executor goes on
instead. An exception from ``start_load_kv``, ``build_connector_meta``, ``get_finished``,
``request_finished``, ``get_num_new_matched_tokens`` or ``update_state_after_alloc`` is not
caught in PE and propagates out of ``run()``: the engine is dead. TensorRT-LLM's error budget
(fatal after repeated errors) is not imitated.

Tokens ``[device_hit, device_hit + n)`` matched by the connector are treated as already in the
pool (the connector writes them); only the rest of the prompt is computed. ``stream`` is
``torch.cuda.current_stream()`` on a GPU and ``None`` on the CPU.
"""

from __future__ import annotations

import pickle
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from kvbm_trtllm.executor.attention_dp import check_attention_dp
from kvbm_trtllm.executor.block_hash import block_hashes
from kvbm_trtllm.executor.completion import _Completion
from kvbm_trtllm.executor.connector import (
    ConnectorContractError,
    ConnectorSpec,
    build_connector,
    resolve_connector,
)
from kvbm_trtllm.executor.cuda_graphs import GraphCaptures
from kvbm_trtllm.executor.distributed import Comm, LocalComm
from kvbm_trtllm.executor.layer_groups import LayerGroups
from kvbm_trtllm.executor.model import ModelConfig, ReferenceModel, SequenceChunk
from kvbm_trtllm.executor.pausing import _Pausing
from kvbm_trtllm.executor.pool import BlockPool, PoolConfig
from kvbm_trtllm.executor.profiles import DEFAULT_TRTLLM_VERSION, get_profile
from kvbm_trtllm.executor.request_state import _Request, _State
from kvbm_trtllm.executor.results import IterationStats, RunResult, request_result
from kvbm_trtllm.executor.scheduling import _Plan, _Scheduling
from kvbm_trtllm.executor.v2 import _KvCacheManagerCalls
from kvbm_trtllm.executor.workloads import Workload
from kvbm_trtllm.trtllm_api import (
    CudaGraphConfigLike,
    KvCacheConfigLike,
    KvCacheConnectorConfigLike,
    LlmArgsLike,
)

__all__ = ["Executor", "ConnectorContractError", "ConnectorSpec", "resolve_connector"]

# ConnectorContractError, ConnectorSpec and resolve_connector live in connector.py; they stay
# importable from here, where they were first defined.

_DEFAULT_CUDA_GRAPHS = CudaGraphConfigLike()  # TorchLlmArgs: Field(default_factory=CudaGraphConfig)


class Executor(_Scheduling, _Completion, _KvCacheManagerCalls, _Pausing):
    def __init__(
        self,
        model_config: ModelConfig,
        pool_config: PoolConfig,
        connector: ConnectorSpec | None = None,
        *,
        trtllm_version: str = DEFAULT_TRTLLM_VERSION,
        overlap: bool = True,
        cuda_graph_config: CudaGraphConfigLike | None = _DEFAULT_CUDA_GRAPHS,
        chunk_size: int | None = None,
        max_batch_size: int = 64,
        max_num_tokens: int = 8192,
        llm_args: LlmArgsLike | None = None,
        comm: Comm | None = None,
        device: str | None = None,
        max_iterations: int = 1_000_000,
        honour_offer: Callable[[int, int], int] | None = None,
        attention_dp_rank: int | None = None,
    ):
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        self.profile = get_profile(trtllm_version)
        self.model_config = model_config
        self.pool_config = pool_config
        self.overlap = overlap
        self.graphs = GraphCaptures(cuda_graph_config)
        self.chunk_size = chunk_size
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_iterations = max_iterations
        self.honour_offer = honour_offer  # V2: tokens of a connector offer committed (v2.py)
        self.comm = comm or LocalComm()
        self.rank = self.comm.rank
        self.tp_size = self.comm.world_size
        self.attention_dp_rank = attention_dp_rank  # attention_dp.py
        self.llm_args = self._llm_args(llm_args, connector, cuda_graph_config)
        if attention_dp_rank is not None and connector is not None:
            check_attention_dp(resolve_connector(connector))
        self.scheduler, self.worker = build_connector(connector, self.llm_args, self.rank)
        self._forward_callable: Callable[[], Any] | None = None
        if self.worker is not None:
            self._forward_callable = self.worker.register_forward_pass_callable() or None
        self.model = ReferenceModel(model_config, self.comm, device=device)
        self._unwritten_pages: set[int] = set()
        self.pool = BlockPool(
            pool_config,
            num_layers=model_config.num_layers,
            num_kv_heads=self.model.num_local_kv_heads,
            head_dim=model_config.head_dim,
            dtype=model_config.torch_dtype,
            device=self.model.device,
            layer_groups=self._layer_groups(connector is not None),
        )
        if self.worker is not None:
            self._check_layer_group_scheduler()
            self._register_pool()

    def _layer_groups(self, has_connector: bool) -> LayerGroups:
        windows = self.model_config.layer_windows
        if self.profile.is_kv_cache_manager_v2:
            return LayerGroups.from_windows(windows)
        if has_connector and len(set(windows)) > 1:
            # V1's BlockManager: TLLM_CHECK "KV Cache Connector is not supported with multiple
            # window sizes" (reference section 7).
            raise ConnectorContractError(
                f"trtllm_version {self.profile.name!r} (KV cache manager V1) does not support a KV "
                f"cache connector with multiple window sizes {sorted(set(windows), key=str)}; use "
                f"trtllm_version='v2'"
            )
        return LayerGroups.single(self.model_config.num_layers)

    def close(self) -> None:
        """Shut down the connector's parts that have a ``shutdown()`` (engines do so at exit)."""
        for part in (self.scheduler, self.worker):
            shutdown = getattr(part, "shutdown", None)
            if callable(shutdown):
                shutdown()

    @property
    def kv_cache_tensor(self) -> torch.Tensor:
        return self.pool.tensor

    def _llm_args(
        self,
        given: LlmArgsLike | None,
        connector: ConnectorSpec | None,
        cuda_graph_config: CudaGraphConfigLike | None,
    ) -> LlmArgsLike:
        """``given`` (or a default) with the executor's scheduler options and the model facts.

        Pool facts (block size, reuse, TP size) must agree with ``given``; the scheduler options
        passed to the executor (overlap, CUDA graphs) are written into it.
        """
        pool = self.pool_config
        args = given or LlmArgsLike(
            model=self.model_config.name,
            kv_cache_config=KvCacheConfigLike(
                tokens_per_block=pool.tokens_per_block, enable_block_reuse=pool.enable_block_reuse
            ),
            tensor_parallel_size=self.tp_size,
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            enable_chunked_prefill=self.chunk_size is not None,
            kv_connector_config=connector
            if isinstance(connector, KvCacheConnectorConfigLike)
            else None,
        )
        self._check_pool_facts(args)
        c = self.model_config
        model_facts = {
            "head_dim": c.head_dim,
            "num_layers": c.num_layers,
            "num_kv_heads": c.num_kv_heads,
            "dtype": c.dtype,
        }
        if self.attention_dp_rank is not None:
            # TensorRT-LLM's ranks tell theirs through MPI; in-process ranks through extra.
            model_facts["attention_dp_rank"] = self.attention_dp_rank
        return replace(
            args,
            disable_overlap_scheduler=not self.overlap,
            cuda_graph_config=cuda_graph_config,
            enable_attention_dp=args.enable_attention_dp or self.attention_dp_rank is not None,
            extra={**model_facts, **args.extra},
        )

    def _check_pool_facts(self, args: LlmArgsLike) -> None:
        kv = args.kv_cache_config
        pool = self.pool_config
        if kv.tokens_per_block != pool.tokens_per_block:
            raise ValueError(
                f"llm_args.kv_cache_config.tokens_per_block={kv.tokens_per_block} "
                f"differs from PoolConfig.tokens_per_block={pool.tokens_per_block}; make them equal"
            )
        if kv.enable_block_reuse != pool.enable_block_reuse:
            raise ValueError(
                f"llm_args.kv_cache_config.enable_block_reuse={kv.enable_block_reuse} differs "
                f"from PoolConfig.enable_block_reuse={pool.enable_block_reuse}; make them equal"
            )
        if args.tensor_parallel_size != self.tp_size:
            raise ValueError(
                f"llm_args.tensor_parallel_size={args.tensor_parallel_size} but the executor runs "
                f"{self.tp_size} rank(s); make them equal"
            )

    # ---- run -------------------------------------------------------------------------------

    def run(self, workload: Workload) -> RunResult:
        self._check_workload(workload)
        self._specs = {r.request_id: r for r in workload.requests}
        self._not_arrived = list(workload.requests)
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []  # admitted, in admission order
        self._finished_ids: set[int] = set()
        self._new_saving_ids: list[int] = []
        self._new_loading_ids: list[int] = []
        self._pending_done: dict[int, set[int]] = {}  # id -> ranks that reported it done
        self._previous_batch: list[tuple[_Request, int | None]] | None = None
        self._iteration = 0
        self._num_paused = 0  # V2 pauses for room (pausing.py), this run
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
        plan = self._share_plan(self._plan() if self.rank == 0 else None)
        if self.rank != 0:
            self._apply_plan(plan)
        batch = [(self._requests[rid], n) for rid, n in plan.scheduled]
        num_context = sum(1 for req, _ in batch if req.state is _State.CONTEXT)
        stream = torch.cuda.current_stream() if self.model.device.type == "cuda" else None
        if self.worker is not None and plan.has_meta:
            self.worker.bind_connector_meta(plan.connector_meta)
            self.worker.start_load_kv(stream)
        sampled = self._forward_step(batch, num_context == 0, stream) if batch else {}
        outputs = [(req, sampled.get(req.request_id)) for req, _ in batch]
        if self.overlap:
            to_process, self._previous_batch = self._previous_batch, outputs
        else:
            to_process = outputs
        self._finish_requests(self._process_outputs(to_process or []))
        if self.worker is not None:
            self._get_finished()
            if self.profile.has_load_error_api:
                self._handle_load_errors()
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

    # ---- forward ---------------------------------------------------------------------------------

    def _forward_step(
        self, batch: list[tuple[_Request, int]], is_generation_only: bool, stream: Any
    ) -> dict[int, int]:
        """PE ``_forward_step``: any exception fails every active request (``_handle_errors``)."""
        try:
            return self._forward(batch, is_generation_only, stream)
        except Exception as e:  # noqa: BLE001 -- PE catches Exception here too
            self._handle_errors(f"Encountered an error in forward function: {e}")
            return {}

    def _forward(
        self, batch: list[tuple[_Request, int]], is_generation_only: bool, stream: Any
    ) -> dict[int, int]:
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
        # A replayed CUDA graph runs no Python inside the model: no layer hooks.
        hooks = worker is not None and self.graphs.runs_layer_hooks(is_generation_only, len(batch))
        tokens = self.model.forward(
            chunks,
            self.pool,
            on_layer_start=(lambda i: worker.wait_for_layer_load(i, stream)) if hooks else None,
            on_layer_end=(lambda i: worker.save_kv_layer(i, stream)) if hooks else None,
        )
        if self._forward_callable is not None:
            self._forward_callable()
        if worker is not None:
            worker.wait_for_save(stream)
        return self._advance(batch, chunks, tokens)

    def _advance(
        self, batch: list[tuple[_Request, int]], chunks: list[SequenceChunk], tokens: list[int]
    ) -> dict[int, int]:
        """Account for a finished forward: positions, committed blocks, sampled tokens."""
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
            req.hashes = block_hashes(
                req.device_tokens[: num_full * self.tokens_per_block],
                self.tokens_per_block,
                req.llm.lora_task_id,
                req.llm.cache_salt_id,
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
            if token is None or req.state is not _State.GENERATION:
                continue  # no token, or failed since (its output stays partial)
            req.llm.tokens.append(token)
            if req.first_token_s is None:
                req.first_token_s = now
                req.first_token_iteration = self._iteration
            if req.num_generated >= req.spec.max_new_tokens:
                finished.append(req)
        return finished

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
        return RunResult(
            requests={rid: request_result(req) for rid, req in sorted(self._requests.items())},
            iterations=self._iterations,
            wall_s=time.perf_counter() - self._start,
            num_evicted_blocks=self.pool.num_evicted_blocks,
        )
