"""TensorRT-LLM's KV cache connector API, real when importable, else identical stand-ins.

What this module provides (every process that builds a connector imports it):
- ``KvCacheConnectorScheduler`` (leader, rank 0 only) and ``KvCacheConnectorWorker`` (every
  rank): TensorRT-LLM's abstract base classes, imported from
  ``tensorrt_llm._torch.pyexecutor.kv_cache_connector`` (1.1/1.2) or
  ``...pyexecutor.connectors.kv_cache_connector`` (newer main) when ``tensorrt_llm`` is
  installed, otherwise local classes with the same names, fields and method signatures.
- ``SchedulerOutput`` / ``RequestData``: the per-iteration delta the scheduler's
  ``build_connector_meta`` receives (same origin rule). The stand-in ``RequestData`` has newest
  main's fields and defaults (``connectors/kv_cache_connector.py``@035ab91c); ``RequestData12``
  is TensorRT-LLM 1.2's five-field shape, always local (what the reference executor sends on
  its ``"1.2"`` profile).
- ``LlmArgsLike`` / ``KvCacheConfigLike`` / ``KvCacheConnectorConfigLike`` /
  ``CudaGraphConfigLike``: the part of ``TorchLlmArgs`` a connector reads, with TensorRT-LLM's
  defaults (``tensorrt_llm/llmapi/llm_args.py``), for engines without TensorRT-LLM (the reference
  executor).
- ``LlmRequestLike``: a hand-made request for unit tests of a connector (``request_id``,
  ``get_tokens(0)``, ``prompt_len``, ``context_current_position``,
  ``is_generation_only_request``, optional ``lora_name`` / ``cache_salt``). It is not what
  TensorRT-LLM passes: the reference executor passes ``executor.llm_request``'s views, which
  carry TensorRT-LLM's attribute names (``lora_task_id``, ``cache_salt_id``, ``py_lora_path``).
- ``current_rank()`` / ``current_world_size()``: this process's tensor-parallel rank, from
  TensorRT-LLM's MPI helpers when present, else from ``torch.distributed`` when initialized,
  else 0 / 1.

A connector must accept either the real objects or these stand-ins; it should read only the
attributes listed here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

__all__ = [
    "HAS_TENSORRT_LLM",
    "KvCacheConnectorScheduler",
    "KvCacheConnectorWorker",
    "SchedulerOutput",
    "RequestData",
    "RequestData12",
    "LlmArgsLike",
    "CudaGraphConfigLike",
    "KvCacheConfigLike",
    "KvCacheConnectorConfigLike",
    "LlmRequestLike",
    "current_rank",
    "current_world_size",
    "register_single_pool",
]


def _import_real() -> tuple[Any, ...] | None:
    for module_name in (
        "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
        "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
    ):
        try:
            module = __import__(module_name, fromlist=["KvCacheConnectorScheduler"])
        except ImportError:
            continue
        return (
            module.KvCacheConnectorScheduler,
            module.KvCacheConnectorWorker,
            module.SchedulerOutput,
            module.RequestData,
        )
    return None


_real = _import_real()
HAS_TENSORRT_LLM = _real is not None

# mypy checks against the stand-ins (TYPE_CHECKING is true for it); at run time they are
# defined only when TensorRT-LLM is absent.
if TYPE_CHECKING or _real is None:

    @dataclass
    class RequestData:
        """One request's delta since its last report: newest main's fields and defaults.

        As ``connectors/kv_cache_connector.py``@035ab91c: ``block_hashes`` is the cumulative
        chain of beam 0, ``priorities`` is set only with a retention config, ``cache_salt`` is
        the request's salt string, ``new_block_ids_by_layer_group`` has one list per layer group.
        """

        request_id: int
        new_tokens: list[int]
        new_block_ids: list[int]
        computed_position: int
        num_scheduled_tokens: int
        block_hashes: list[int] = field(default_factory=list)
        priorities: list[int] | None = None
        cache_salt: str | None = None
        new_block_ids_by_layer_group: list[list[int]] = field(default_factory=list)

    @dataclass
    class SchedulerOutput:
        """Requests scheduled this iteration: first appearances and later steps."""

        new_requests: list[RequestData] = field(default_factory=list)
        cached_requests: list[RequestData] = field(default_factory=list)
        attention_dp_rank: int | None = None

    class KvCacheConnectorWorker(ABC):
        """Data plane: one per rank. Mirrors TensorRT-LLM's abstract worker."""

        supports_attention_dp: bool = False

        def __init__(self, llm_args: Any):
            self._llm_args = llm_args
            self._metadata: object = None

        def bind_connector_meta(self, metadata: object) -> None:
            self._metadata = metadata

        def get_connector_meta(self) -> object:
            return self._metadata

        def _clear_connector_meta(self) -> None:
            self._metadata = None

        def register_forward_pass_callable(self) -> Callable[[], None] | None:
            return None

        @abstractmethod
        def register_kv_caches(self, kv_cache_tensor: Any) -> None: ...

        def register_kv_cache_layout(self, layout: Any) -> None:
            """KVCacheManagerV2's registration; the default forwards a one-pool cache."""
            register_single_pool(self, layout)

        @abstractmethod
        def start_load_kv(self, stream: Any) -> None: ...

        @abstractmethod
        def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None: ...

        @abstractmethod
        def save_kv_layer(self, layer_idx: int, stream: Any) -> None: ...

        @abstractmethod
        def wait_for_save(self, stream: Any) -> None: ...

        @abstractmethod
        def get_finished(
            self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
        ) -> tuple[list[int], list[int]]: ...

    class KvCacheConnectorScheduler(ABC):
        """Control plane: rank 0 only (every rank under attention DP). Mirrors TensorRT-LLM's
        abstract scheduler, with main's concrete per-layer-group and V2-only methods."""

        supports_attention_dp: bool = False

        def __init__(self, llm_args: Any):
            self._llm_args = llm_args

        def update_state_after_alloc_by_layer_group(
            self, request: Any, block_ids_by_layer_group: list[list[int]]
        ) -> None:
            self.update_state_after_alloc(request, _only_group(block_ids_by_layer_group))

        def request_finished_by_layer_group(
            self, request: Any, cache_block_ids_by_layer_group: list[list[int]]
        ) -> bool:
            return self.request_finished(request, _only_group(cache_block_ids_by_layer_group))

        # The flat-only defaults, which TensorRT-LLM refuses with several layer groups.
        update_state_after_alloc_by_layer_group._is_flat_default = True  # type: ignore[attr-defined]
        request_finished_by_layer_group._is_flat_default = True  # type: ignore[attr-defined]

        def request_reset(self, request: Any) -> None:  # noqa: B027 - optional hook
            """KVCacheManagerV2 rolled the request back (pause, replay); default: nothing."""

        def cancel_load(self, request: Any, start: int, end: int) -> None:  # noqa: B027
            """KVCacheManagerV2 will not use offered tokens ``[start, end)``; default: nothing."""

        def wait_for_initialization(self) -> None:  # noqa: B027 - optional hook
            """Called once before the first request; default: nothing."""

        @abstractmethod
        def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object: ...

        @abstractmethod
        def get_num_new_matched_tokens(
            self, request: Any, num_computed_tokens: int
        ) -> tuple[int, bool]: ...

        @abstractmethod
        def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool: ...

        @abstractmethod
        def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None: ...

else:
    KvCacheConnectorScheduler, KvCacheConnectorWorker, SchedulerOutput, RequestData = _real


def _only_group(lists: list[list[int]]) -> list[int]:
    if len(lists) != 1:
        raise NotImplementedError(
            f"this connector implements only the flat callbacks but the KV cache has {len(lists)} "
            "layer groups; implement the *_by_layer_group methods"
        )
    return list(lists[0])


def register_single_pool(worker: Any, layout: Any) -> None:
    """``register_kv_caches`` with the one pool tensor a one-group, one-region layout views."""
    groups = layout.groups
    if len(groups) != 1 or len(groups[0].regions) != 1:
        raise NotImplementedError(
            f"the KV cache layout has {len(groups)} layer group(s) and is not one pool tensor; "
            f"{type(worker).__name__} must implement register_kv_cache_layout"
        )
    region = groups[0].regions[0]
    owner = getattr(region, "owner", None)
    worker.register_kv_caches(owner if owner is not None else region.as_tensor())


@dataclass
class RequestData12:
    """TensorRT-LLM 1.2's ``RequestData``: these five fields only (no hashes, no salt).

    From the 1.2-era ``_torch/pyexecutor/kv_cache_connector.py`` (reference §3). A distinct class,
    not the main one with defaults, so a connector reading ``data.cache_salt`` fails on 1.2 as it
    would there.
    """

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclass
class KvCacheConfigLike:
    """What a connector reads of ``TorchLlmArgs.kv_cache_config``, with TensorRT-LLM's defaults."""

    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    enable_partial_reuse: bool = True  # TensorRT-LLM's default (llm_args.py KvCacheConfig)
    max_tokens: int | None = None
    host_cache_size: int | None = None


@dataclass
class KvCacheConnectorConfigLike:
    """``kv_connector_config``: where TensorRT-LLM imports the connector classes from."""

    connector_module: str
    connector_scheduler_class: str
    connector_worker_class: str


@dataclass(frozen=True)
class CudaGraphConfigLike:
    """``TorchLlmArgs.cuda_graph_config``: graphs for generation-only batches.

    Defaults and batch sizes as ``CudaGraphConfig`` in ``tensorrt_llm/llmapi/llm_args.py``
    (index id 1090804222): with no ``batch_sizes``, ``max_batch_size`` 0 means 128 and the sizes
    are 1..31, 32, 64, 128 plus powers of two up to the maximum (1, 2, 4, 8..128 by 8 with
    padding), then the maximum itself.
    """

    batch_sizes: tuple[int, ...] | None = None
    max_batch_size: int = 0
    enable_padding: bool = False

    def resolved_batch_sizes(self) -> tuple[int, ...]:
        if self.batch_sizes:
            return tuple(sorted(self.batch_sizes))
        max_batch_size = self.max_batch_size or 128
        if self.enable_padding:
            sizes = [1, 2, 4] + [i * 8 for i in range(1, 17)]
        else:
            sizes = list(range(1, 32)) + [32, 64, 128]
        sizes += [2**i for i in range(8, max(8, math.ceil(math.log2(max_batch_size))))]
        sizes = sorted(s for s in set(sizes) if s <= max_batch_size)
        if sizes[-1] != max_batch_size:
            sizes.append(max_batch_size)
        return tuple(sizes)


@dataclass
class LlmArgsLike:
    """What a connector reads of ``TorchLlmArgs``; the reference executor passes this."""

    model: str = "reference-llama"
    kv_cache_config: KvCacheConfigLike = field(default_factory=KvCacheConfigLike)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_connector_config: KvCacheConnectorConfigLike | None = None
    backend: str = "pytorch"
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    enable_chunked_prefill: bool = False
    disable_overlap_scheduler: bool = False  # the overlap scheduler is TensorRT-LLM's default
    cuda_graph_config: CudaGraphConfigLike | None = field(default_factory=CudaGraphConfigLike)
    dtype: str = "auto"
    enable_attention_dp: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class LlmRequestLike:
    """What a connector may read of TensorRT-LLM's C++ ``LlmRequest`` (beam 0 only)."""

    def __init__(
        self,
        request_id: int,
        prompt_token_ids: list[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        is_generation_only_request: bool = False,
    ):
        self.request_id = request_id
        self._tokens = list(prompt_token_ids)
        self.prompt_len = len(prompt_token_ids)
        self.context_current_position = 0
        self.lora_name = lora_name
        self.cache_salt = cache_salt
        self._is_generation_only = is_generation_only_request

    @property
    def is_generation_only_request(self) -> bool:
        return self._is_generation_only

    def get_tokens(self, beam: int = 0) -> list[int]:
        if beam != 0:
            raise ValueError(f"only beam 0 exists (beam width 1), got beam {beam}")
        return list(self._tokens)

    def get_num_tokens(self, beam: int = 0) -> int:
        return len(self._tokens)

    def add_new_token(self, token: int, beam: int = 0) -> None:
        self._tokens.append(token)

    def __repr__(self) -> str:
        return (
            f"LlmRequestLike(request_id={self.request_id}, prompt_len={self.prompt_len}, "
            f"num_tokens={len(self._tokens)}, context_current_position={self.context_current_position})"
        )


def current_rank() -> int:
    try:
        from tensorrt_llm._utils import mpi_rank  # type: ignore[import-not-found]

        return int(mpi_rank())
    except ImportError:
        pass
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def current_world_size() -> int:
    try:
        from tensorrt_llm._utils import mpi_world_size  # type: ignore[import-not-found]

        return int(mpi_world_size())
    except ImportError:
        pass
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
