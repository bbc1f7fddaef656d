"""kvbm-runtime: the engine-neutral leader and worker cores below every engine adapter.

An adapter (TensorRT-LLM's connector in ``kvbm_trtllm``; a vLLM or SGLang one the same way)
builds a :class:`KvbmLeaderCore` in its scheduler process and a :class:`KvbmWorkerCore` in
every rank's process, and hands them engine-neutral inputs: a ``KvLayout`` of the GPU pool, a
request's salt inputs, request ids and block ids. Imports no torch and no engine at import time.
"""

from kvbm_runtime.leader import KvbmLeaderCore
from kvbm_runtime.salt import SaltInputs
from kvbm_runtime.services import RuntimeControl, RuntimeDiscovery, RuntimeServices
from kvbm_runtime.worker import KvbmWorkerCore, TransferProbe, WorkerSetup

__all__ = [
    "KvbmLeaderCore",
    "KvbmWorkerCore",
    "RuntimeControl",
    "RuntimeDiscovery",
    "RuntimeServices",
    "SaltInputs",
    "TransferProbe",
    "WorkerSetup",
]
__version__ = "0.1.0"
