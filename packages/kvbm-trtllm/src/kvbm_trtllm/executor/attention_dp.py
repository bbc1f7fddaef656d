"""Attention data parallelism (TensorRT-LLM ``enable_attention_dp=True``), in-process ranks.

Sources: DOC = ``docs/source/features/kv-cache-connector.md``@0972960b and the 1.4.0rc4 docs:
with attention DP each rank schedules its own requests over its own KV cache; a connector
scheduler and a connector worker run on every rank; both classes must declare
``supports_attention_dp = True`` or they are rejected before construction; there are no
connector collectives (``get_finished`` is local to the rank); ``SchedulerOutput``
carries ``attention_dp_rank``. Rules: PP=1, CP=1, beam width 1.

- ``check_attention_dp(connector_classes)``: the opt-in check, before anything is built.
- ``run_attention_dp(workloads, model_config, pool_config, connector, **executor_kwargs)``:
  one ``Executor`` per rank (``attention_dp_rank=r``), each with its own pool and its own
  requests (``workloads[r]``), run concurrently in threads, as TensorRT-LLM's ADP ranks run
  side by side; returns each rank's ``RunResult``. The reference model's MoE/dense layers are
  not shared between ranks here: attention DP changes nothing else a connector sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvbm_trtllm.executor.connector import ConnectorContractError
from kvbm_trtllm.executor.model import ModelConfig
from kvbm_trtllm.executor.pool import PoolConfig
from kvbm_trtllm.executor.results import RunResult
from kvbm_trtllm.executor.workloads import Workload

__all__ = ["check_attention_dp", "run_attention_dp"]


def check_attention_dp(connector_classes: tuple[type, type]) -> None:
    for cls in connector_classes:
        if not getattr(cls, "supports_attention_dp", False):
            raise ConnectorContractError(
                f"{cls.__name__} does not declare supports_attention_dp = True; TensorRT-LLM "
                "rejects a connector with enable_attention_dp=True unless both classes do"
            )


def run_attention_dp(
    workloads: Sequence[Workload],
    model_config: ModelConfig,
    pool_config: PoolConfig,
    connector: Any = None,
    **executor_kwargs: Any,
) -> list[RunResult]:
    from kvbm_trtllm.executor.executor import Executor

    if len(workloads) < 2:
        raise ValueError(f"attention DP needs at least 2 ranks (one workload each), got {len(workloads)}")
    executors = [
        Executor(model_config, pool_config, connector, attention_dp_rank=rank, **executor_kwargs)
        for rank in range(len(workloads))
    ]
    try:
        with ThreadPoolExecutor(max_workers=len(workloads)) as pool:
            futures = [pool.submit(e.run, w) for e, w in zip(executors, workloads, strict=True)]
            return [f.result() for f in futures]
    finally:
        for executor in executors:
            executor.close()
