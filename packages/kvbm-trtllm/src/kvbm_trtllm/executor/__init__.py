"""The reference executor: a stand-in for TensorRT-LLM's PyTorch backend around a KV connector.

A paged Llama-style model over a block pool in TensorRT-LLM's layout, driven by a loop that
calls a KV cache connector exactly as PyExecutor does (see ``executor.py``). Used by tests, by
``kvbm bench`` and by tier-plugin authors.

    from kvbm_trtllm.executor import Executor, ModelConfig, PoolConfig, multi_turn_chat
    result = Executor(ModelConfig.tiny(), PoolConfig(num_blocks=64), connector=None).run(
        multi_turn_chat()
    )

``trtllm_version`` picks the TensorRT-LLM version imitated (``PROFILES``: "1.2", "main" -- the
default --, "main+load-errors", "v2" -- KVCacheManagerV2 --); ``run_attention_dp`` runs
attention-DP ranks in-process; ``CppLlmRequest`` / ``PyLlmRequest`` are the two request views
a connector receives.
"""

from kvbm_trtllm.executor.attention_dp import run_attention_dp
from kvbm_trtllm.executor.connector import (
    ConnectorContractError,
    ConnectorSpec,
    resolve_connector,
)
from kvbm_trtllm.executor.executor import Executor
from kvbm_trtllm.executor.llm_request import (
    CppLlmRequest,
    PyLlmRequest,
    cache_salt_id,
    lora_task_id,
)
from kvbm_trtllm.executor.model import ModelConfig, ReferenceModel, SequenceChunk
from kvbm_trtllm.executor.null_connector import (
    NULL_CONNECTOR,
    NullConnectorScheduler,
    NullConnectorWorker,
)
from kvbm_trtllm.executor.pool import BlockPool, PoolConfig
from kvbm_trtllm.executor.profiles import DEFAULT_TRTLLM_VERSION, PROFILES, TrtllmProfile
from kvbm_trtllm.executor.results import IterationStats, RequestResult, RunResult
from kvbm_trtllm.executor.tp import run_tp
from kvbm_trtllm.executor.workloads import (
    RequestSpec,
    Workload,
    long_document_qa,
    multi_turn_chat,
    prefix_repetition,
)

__all__ = [
    "Executor",
    "PROFILES",
    "DEFAULT_TRTLLM_VERSION",
    "TrtllmProfile",
    "CppLlmRequest",
    "PyLlmRequest",
    "lora_task_id",
    "cache_salt_id",
    "ConnectorContractError",
    "ConnectorSpec",
    "resolve_connector",
    "ModelConfig",
    "ReferenceModel",
    "SequenceChunk",
    "PoolConfig",
    "BlockPool",
    "RunResult",
    "RequestResult",
    "IterationStats",
    "run_tp",
    "run_attention_dp",
    "RequestSpec",
    "Workload",
    "multi_turn_chat",
    "long_document_qa",
    "prefix_repetition",
    "NULL_CONNECTOR",
    "NullConnectorScheduler",
    "NullConnectorWorker",
]
