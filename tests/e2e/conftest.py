"""Shared helpers for end-to-end runs of the kvbm connector inside the reference executor.

The executor stands in for TensorRT-LLM's PyExecutor (which cannot be installed here); the
connector, tiers and discovery are the real ones. ``KVBM_TEST_DEVICE=cuda`` runs the model, its
block pool and so the connector's GPU paths on the GPU (CUDA graphs stay on, as the executor's
TensorRT-LLM default has them); the default is the CPU.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_trtllm.executor import Executor, ModelConfig, PoolConfig
from kvbm_trtllm.trtllm_api import KvCacheConfigLike, LlmArgsLike

TOKENS_PER_BLOCK = 16
DEVICE = os.environ.get("KVBM_TEST_DEVICE", "cpu")
_namespaces = itertools.count()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class KvbmRun:
    result: Any
    stats: dict[str, float]
    executor: Executor


def model_config() -> ModelConfig:
    return ModelConfig.tiny(device=DEVICE)


def recompute(workload, model: ModelConfig | None = None):
    """Outputs with no connector and no reuse at all: every token computed."""
    model = model or model_config()
    pool = PoolConfig(num_blocks=4000, tokens_per_block=TOKENS_PER_BLOCK, enable_block_reuse=False)
    return Executor(model, pool).run(workload)


def llm_args(kvbm: dict[str, Any], model: ModelConfig | None = None) -> LlmArgsLike:
    model = model or model_config()
    settings = {"namespace": f"e2e{next(_namespaces)}", **kvbm}
    return LlmArgsLike(
        model=model.name,
        kv_cache_config=KvCacheConfigLike(tokens_per_block=TOKENS_PER_BLOCK),
        extra={"kvbm": settings},
    )


def build(kvbm: dict[str, Any], num_gpu_blocks: int, **executor_kwargs) -> Executor:
    model = model_config()
    return Executor(
        model,
        PoolConfig(num_blocks=num_gpu_blocks, tokens_per_block=TOKENS_PER_BLOCK),
        (KvbmConnectorLeader, KvbmConnectorWorker),
        llm_args=llm_args(kvbm, model),
        **executor_kwargs,
    )


def finish(executor: Executor, result) -> KvbmRun:
    stats = executor.scheduler.stats.snapshot()
    executor.worker.shutdown()
    executor.scheduler.shutdown()
    return KvbmRun(result, stats, executor)


def run_kvbm(workload, kvbm: dict[str, Any], num_gpu_blocks: int, **executor_kwargs) -> KvbmRun:
    executor = build(kvbm, num_gpu_blocks, **executor_kwargs)
    return finish(executor, executor.run(workload))


class E2E:
    """The helpers above, for test modules (pytest's importlib mode cannot import conftest)."""

    tokens_per_block = TOKENS_PER_BLOCK
    device = DEVICE
    recompute = staticmethod(recompute)
    run_kvbm = staticmethod(run_kvbm)
    build = staticmethod(build)
    finish = staticmethod(finish)
    llm_args = staticmethod(llm_args)
    model_config = staticmethod(model_config)


@pytest.fixture(scope="session")
def e2e() -> type[E2E]:
    return E2E
