"""The KV cache connector as the reference executor sees it: which classes, built how, and
what it must return.

Operations (all run in the executor's process, on the rank named):
- ``resolve_connector(spec) -> (scheduler_cls, worker_cls)``: from a class pair or TensorRT-LLM's
  three import strings (``KvCacheConnectorConfigLike``); anything else raises ``TypeError``.
- ``build_connector(spec, llm_args, rank) -> (scheduler, worker)``: the worker on every rank and
  the scheduler on rank 0 only, built concurrently; ``(None, None)`` without a connector.
- ``check_matched_tokens(result, request_id, device_hit, prompt_len) -> (n, is_async)``
  (rank 0): what ``get_num_new_matched_tokens`` returned must be ``(int, bool)`` with
  ``n >= 0``, never ``(0, True)``, and ``device_hit + n < prompt_len``.
- ``check_finished(result) -> (finished_saving_ids, finished_loading_ids)`` (every rank): what
  ``get_finished`` returned must unpack into two iterables of ids.

A violation raises ``ConnectorContractError``, as TensorRT-LLM would reject it.
"""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvbm_trtllm.trtllm_api import KvCacheConnectorConfigLike, LlmArgsLike

__all__ = [
    "ConnectorContractError",
    "ConnectorSpec",
    "resolve_connector",
    "build_connector",
    "check_matched_tokens",
    "check_finished",
]

ConnectorSpec = tuple[type, type] | KvCacheConnectorConfigLike
"""``(scheduler_cls, worker_cls)`` or TensorRT-LLM's three import strings."""


class ConnectorContractError(RuntimeError):
    """The connector returned something TensorRT-LLM would reject."""


def resolve_connector(spec: ConnectorSpec) -> tuple[type, type]:
    if isinstance(spec, KvCacheConnectorConfigLike):
        module = importlib.import_module(spec.connector_module)
        return getattr(module, spec.connector_scheduler_class), getattr(
            module, spec.connector_worker_class
        )
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec
    raise TypeError(
        f"connector must be (scheduler_cls, worker_cls) or KvCacheConnectorConfigLike, got {spec!r}"
    )


def build_connector(
    spec: ConnectorSpec | None, llm_args: LlmArgsLike, rank: int
) -> tuple[Any, Any]:
    if spec is None:
        return None, None
    scheduler_cls, worker_cls = resolve_connector(spec)
    # Concurrent, as TensorRT-LLM does, so the two may handshake while being built.
    with ThreadPoolExecutor(max_workers=2) as pool:
        worker_future = pool.submit(worker_cls, llm_args)
        scheduler_future = pool.submit(scheduler_cls, llm_args) if rank == 0 else None
        worker = worker_future.result()
        scheduler = scheduler_future.result() if scheduler_future is not None else None
    return scheduler, worker


def check_matched_tokens(
    result: Any, request_id: int, device_hit: int, prompt_len: int
) -> tuple[int, bool]:
    try:
        n, is_async = result
        n, is_async = int(n), bool(is_async)
    except (TypeError, ValueError):
        raise ConnectorContractError(
            f"get_num_new_matched_tokens must return (int, bool), got {result!r}"
        ) from None
    if n < 0:
        raise ConnectorContractError(f"request {request_id}: negative matched tokens {n}")
    if n == 0 and is_async:
        raise ConnectorContractError(
            f"request {request_id}: get_num_new_matched_tokens returned (0, True); an "
            f"async load needs at least one token (TensorRT-LLM raises RuntimeError too)"
        )
    if device_hit + n >= prompt_len:
        raise ConnectorContractError(
            f"request {request_id}: {device_hit} device-reused + {n} connector tokens "
            f">= prompt length {prompt_len}; at least one prompt token must be left to compute"
        )
    return n, is_async


def check_finished(result: Any) -> tuple[list[int], list[int]]:
    try:
        done_saving, done_loading = (list(x) for x in result)
    except (TypeError, ValueError):
        raise ConnectorContractError(
            f"get_finished must return (finished_saving_ids, finished_loading_ids), got {result!r}"
        ) from None
    return done_saving, done_loading
