"""kvbm's TensorRT-LLM KV cache connector.

Use it from the LLM API YAML (``trtllm-serve --extra_llm_api_options``)::

    kv_connector_config:
      connector_module: kvbm_trtllm.connector
      connector_scheduler_class: KvbmConnectorLeader
      connector_worker_class: KvbmConnectorWorker

``DynamoKVBMConnectorLeader`` / ``DynamoKVBMConnectorWorker`` are the same classes under
Dynamo's names, so moving from Dynamo's KVBM changes only ``connector_module``.

- ``KvbmConnectorLeader`` (a ``KvCacheConnectorScheduler``; rank 0 only): looks prompts up in
  the tiers, plans loads and write-through stores, and tracks completions. Returns ``(n,
  True)`` (asynchronous load, the request parked until loaded) unless ``KVBM_ASYNC_LOAD=0``;
  never ``(0, True)``; always leaves a prompt token to compute; ``request_finished`` is True
  while jobs touching the request's GPU blocks are pending.
- ``KvbmConnectorWorker`` (a ``KvCacheConnectorWorker``; every rank): executes each
  iteration's plan on this rank's share of the tiers. Stores start after the forward pass on a
  recorded CUDA event (through ``register_forward_pass_callable``, so CUDA graphs are fine);
  ``get_finished`` returns only ids it was given, each once.

Configuration comes from ``KVBM_*`` / ``DYN_KVBM_*`` environment variables; an engine without
TensorRT-LLM may also pass a mapping as ``llm_args.extra["kvbm"]``.

What kvbm reads of TensorRT-LLM's objects, and where TensorRT-LLM defines it:
- ``get_num_new_matched_tokens`` gets the C++ base ``LlmRequest`` (``connectors/
  kv_cache_connector.py``: "casts it to the base-class LlmRequest"), so only what
  ``nanobind/batch_manager/bindings.cpp`` binds: ``request_id``, ``prompt_len``,
  ``get_tokens(0)``, ``lora_task_id`` and ``cache_salt_id`` (optional ints; the same fields
  TensorRT-LLM's own block reuse keys on), ``context_current_position`` (read-write).
- ``RequestData.cache_salt`` (TensorRT-LLM main; "connectors MUST mix cache_salt into their
  identifiers") salts requests kvbm never looked up (block reuse off); a request object that
  tells no salt while ``RequestData`` may carry one matches nothing.
- The model identity: ``llm_args.model`` (its ``config.json`` and weight files when it is a
  directory), ``llm_args.revision`` and ``KVBM_MODEL_ID`` (:mod:`kvbm_trtllm.pool_layout`).
- Exceptions: TensorRT-LLM's executor catches only what is raised inside its forward step
  (layer hooks, the forward-pass callable, ``wait_for_save``) and fails the active requests;
  anything else kills the engine (``py_executor.py``). So a forward that must not run (a sync
  load failed) is failed from inside the forward step, never from ``start_load_kv``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvbm_core.config import KvbmConfig
from kvbm_core.manager import IterationPlan
from kvbm_core.plugins import load_discovery_backend, shared_plugin_manager
from kvbm_runtime import KvbmLeaderCore, KvbmWorkerCore, WorkerSetup
from kvbm_trtllm.pool_layout import layout_from_pool, model_facts, model_identity
from kvbm_trtllm.request_identity import RequestSalts
from kvbm_trtllm.trtllm_api import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    SchedulerOutput,
    current_rank,
)
from kvbm_trtllm.v2_connector import (
    PRIMARY_GROUP_KEY,
    LayerGroupLeader,
    LayerGroupWorker,
    attention_dp_rank,
    for_attention_dp,
)
from kvbm_trtllm.v2_layout import primary_group_index, region_pool

log = logging.getLogger("kvbm.connector")

__all__ = [
    "KvbmConnectorLeader",
    "KvbmConnectorWorker",
    "DynamoKVBMConnectorLeader",
    "DynamoKVBMConnectorWorker",
]


def load_config(llm_args: Any) -> KvbmConfig:
    extra = getattr(llm_args, "extra", None)
    overrides = extra.get("kvbm") if isinstance(extra, dict) else None
    return for_attention_dp(KvbmConfig.from_env(overrides=overrides), llm_args)


def make_services(config: KvbmConfig) -> Any:
    """The configured discovery backend's services (a ``kvbm_runtime.RuntimeServices``)."""
    spec = load_discovery_backend(shared_plugin_manager(config.disabled_plugins), config.discovery)
    return spec.make(config)


def tokens_per_block(llm_args: Any) -> int:
    return int(llm_args.kv_cache_config.tokens_per_block)


def world_size(llm_args: Any) -> int:
    if attention_dp_rank(llm_args) is not None:
        return 1  # every attention-DP rank is a kvbm group of its own (v2_connector)
    parallel = getattr(llm_args, "parallel_config", None)
    if parallel is not None and getattr(parallel, "world_size", None):
        return int(parallel.world_size)
    return int(getattr(llm_args, "tensor_parallel_size", 1) or 1)


def _check_supported(llm_args: Any) -> None:
    pp = int(getattr(llm_args, "pipeline_parallel_size", 1) or 1)
    if pp > 1:
        raise NotImplementedError(
            f"kvbm supports pipeline_parallel_size=1 only (got {pp}), as TensorRT-LLM's connector API does"
        )
    kv = getattr(llm_args, "kv_cache_config", None)
    if kv is not None and getattr(kv, "enable_partial_reuse", False):
        log.warning(
            "kvbm: kv_cache_config.enable_partial_reuse is on; a device hit ending inside a block "
            "cannot continue in kvbm's tiers. Set enable_partial_reuse: false for more hits."
        )


class KvbmConnectorLeader(LayerGroupLeader, KvCacheConnectorScheduler):
    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        _check_supported(llm_args)
        self.config = load_config(llm_args)
        self.services = make_services(self.config)
        self.core = KvbmLeaderCore(
            self.config, self.services, world_size(llm_args), tokens_per_block(llm_args),
            model_identity(llm_args, self.config.model_id),
        )
        self.core.start()
        self.salts = RequestSalts(self.core)
        self._allocated: dict[int, Any] = {}
        self.metrics_server = None
        if self.config.metrics:
            from kvbm_trtllm.metrics import start_metrics_server

            self.metrics_server = start_metrics_server(
                self.core.stats, self.config.metrics_port, self.config.metrics_host
            )

    @property
    def stats(self):
        return self.core.stats

    def _manager(self):
        manager = self.core.wait_ready()
        self.core.drain_results()
        return manager

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        with self.core.lock:
            manager = self._manager()
            salt = self.salts.salt_for(request)
            if salt is None or _flag(request, "is_generation_only_request"):
                return 0, False
            tokens = list(request.get_tokens(0))[: int(request.prompt_len)]
            self.note_device_hit(int(request.request_id), int(num_computed_tokens))
            match = manager.lookup(
                int(request.request_id), tokens, int(num_computed_tokens), salt,
                is_sync_load=not self.config.async_load,
            )
        return match.num_tokens, bool(match.num_tokens) and self.config.async_load

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        with self.core.lock:
            request_id = int(request.request_id)
            jobs = self._manager().prepare_load(request_id, list(block_ids))
            if jobs:
                self.core.track(request_id, _rewinder(request))  # a load may still fail
            self._allocated[request_id] = request  # its identity, for its first report

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object:
        with self.core.lock:
            manager = self._manager()
            for data in scheduler_output.new_requests:
                if hasattr(data, "cache_salt"):
                    self.salts.request_data_has_salt = True
                request = self._allocated.pop(data.request_id, _NoIdentity)
                salt = self.salts.salt_for(request, getattr(data, "cache_salt", None))
                manager.schedule(
                    data.request_id, data.new_tokens, self.block_ids_of(data),
                    data.computed_position, data.num_scheduled_tokens, is_new=True, salt=salt,
                )
            for data in scheduler_output.cached_requests:
                manager.schedule(
                    data.request_id, data.new_tokens, self.block_ids_of(data),
                    data.computed_position, data.num_scheduled_tokens,
                )
            return self.wrap_plan(manager.build_plan())

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        with self.core.lock:
            request_id = int(request.request_id)
            self.core.forget(request_id)
            self._allocated.pop(request_id, None)
            return self._manager().finish(request_id)

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.core.close()
        self.services.close()


class KvbmConnectorWorker(LayerGroupWorker, KvCacheConnectorWorker):
    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        _check_supported(llm_args)
        self.config = load_config(llm_args)
        self.services = make_services(self.config)
        self.facts = model_facts(llm_args)
        self.setup = WorkerSetup(
            rank=0 if attention_dp_rank(llm_args) is not None else current_rank(),
            world_size=world_size(llm_args),
            tokens_per_block=tokens_per_block(llm_args), head_dim=self.facts.head_dim,
            model_id=model_identity(llm_args, self.config.model_id),
        )
        self.core = KvbmWorkerCore(self.config, self.setup, self.services)
        self._last_iteration: int | None = None
        self._is_cuda = False

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        self._is_cuda = bool(getattr(kv_cache_tensor, "is_cuda", False))
        layout = layout_from_pool(
            kv_cache_tensor, self.setup.tokens_per_block, self.facts, self.setup.world_size
        )
        self.core.register_kv_caches([kv_cache_tensor], layout)
        self.core.report_persisted_blocks()

    def register_kv_cache_layout(self, layout: Any) -> None:
        """KVCacheManagerV2: page regions per layer group (``v2_layout``), in place of a pool."""
        pool = region_pool(layout)
        self.region_pool = pool
        self._is_cuda = getattr(pool.device, "type", str(pool.device)) == "cuda"
        metadata = {PRIMARY_GROUP_KEY: str(primary_group_index(layout))}
        self.core.register_kv_caches([], pool.layout, pool=pool, metadata=metadata)
        self.core.report_persisted_blocks()


    def register_forward_pass_callable(self):
        return self._after_forward

    def _record_event(self, stream: Any = None) -> Any:
        if not self._is_cuda:
            return None
        import torch

        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return event

    def _after_forward(self) -> None:
        self._raise_forward_error()
        if self.core.has_deferred_jobs:
            self.core.after_forward(self._record_event())

    def _raise_forward_error(self) -> None:
        # Raised inside TensorRT-LLM's forward step, which fails the batch and goes on.
        error = self.core.forward_error()
        if error is not None:
            raise KvbmLoadError(error)

    def start_load_kv(self, stream: Any) -> None:
        plan = self.apply_pages(self.get_connector_meta())
        iteration = getattr(plan, "iteration", None)
        if plan is None or iteration == self._last_iteration:
            return  # nothing bound, or the same plan bound again on an idle iteration
        if not isinstance(plan, IterationPlan):
            raise TypeError(
                f"the connector metadata bound to the kvbm worker is a {type(plan).__name__}, not "
                "a kvbm IterationPlan; kv_connector_config must name kvbm's scheduler and worker "
                "classes together"
            )
        self._last_iteration = iteration
        self.core.start_iteration(plan)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        # Loads land before the forward pass (sync) or before the request is scheduled (async);
        # the first layer is where a forward that must not run is stopped.
        if layer_idx == 0:
            self._raise_forward_error()

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        pass  # stores start once the whole forward pass is done, on one event

    def wait_for_save(self, stream: Any) -> None:
        # Engines that never call the forward-pass callable still get their stores started here.
        self._raise_forward_error()
        if self.core.has_deferred_jobs:
            self.core.after_forward(self._record_event(stream))

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        return self.core.get_finished(finished_gen_req_ids, started_loading_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """GPU blocks whose load failed for good since the last call.

        TensorRT-LLM main does not call this (only the closed PR #15425 and forks do, and fail
        the request); where an engine calls it, requests kvbm cannot rewind are reported here
        instead of failing the whole forward step.
        """
        return self.core.take_load_errors()

    def shutdown(self) -> None:
        self.core.close()
        self.services.close()


class KvbmLoadError(RuntimeError):
    """KV that a forward step needs could not be loaded; the step must fail, not run."""


class _NoIdentity:
    """A request the connector never saw allocated: its salt can come from ``RequestData`` only."""


def _rewinder(request: Any) -> Callable[[int], None]:
    """Rewind a request to a token: ``context_current_position`` is writable in the bindings."""

    def rewind(token: int) -> None:
        request.context_current_position = token

    return rewind


def _flag(obj: Any, name: str) -> bool:
    # The C++ binding has a property; TensorRT-LLM's Python LlmRequest a method of that name.
    value = getattr(obj, name, False)
    return bool(value() if callable(value) else value)


DynamoKVBMConnectorLeader = KvbmConnectorLeader
DynamoKVBMConnectorWorker = KvbmConnectorWorker
