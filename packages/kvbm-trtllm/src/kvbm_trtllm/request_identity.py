"""A TensorRT-LLM request's salt inputs, read the way TensorRT-LLM exposes them (leader).

Runs in the scheduler process, for the connector's leader.

- ``RequestIdentity.lora(request)`` / ``.cache_salt(request, data_salt)``: the LoRA adapter
  (``lora_task_id``, as TensorRT-LLM keys its own block reuse) and the tenant salt
  (``cache_salt_id`` on the request, or ``RequestData.cache_salt``).
- ``RequestSalts(core).salt_for(request, data_salt)``: the request's block-hash seed from the
  leader core, or ``None`` while its tenant salt cannot be known yet (a request object that
  tells no salt while this engine's ``RequestData`` may carry one matches nothing).
"""

from __future__ import annotations

from typing import Any

from kvbm_runtime.leader import KvbmLeaderCore
from kvbm_runtime.salt import SaltInputs
from kvbm_trtllm.trtllm_api import RequestData

__all__ = ["RequestIdentity", "RequestSalts"]

_MISSING = object()


class RequestIdentity:
    """The parts of a request's identity TensorRT-LLM exposes, read the way it exposes them."""

    @staticmethod
    def lora(request: Any) -> str | None:
        task_id = getattr(request, "lora_task_id", None)
        return None if task_id is None else f"task:{int(task_id)}"

    @staticmethod
    def cache_salt(request: Any, data_salt: str | None = None) -> tuple[bool, str | None]:
        """``(is_known, key)``: whether the tenant salt is known, and the salt.

        The request object comes first (it is what the lookup saw); ``data_salt`` is
        ``RequestData.cache_salt``, for requests the lookup never saw.
        """
        salt_id: Any = getattr(request, "cache_salt_id", _MISSING)
        if salt_id is not _MISSING and salt_id is not None:
            return True, f"id:{int(salt_id)}"
        salt = getattr(request, "cache_salt", _MISSING)
        if salt is not _MISSING and salt is not None and not callable(salt):
            return True, f"salt:{salt}"
        if data_salt is not None:
            return True, f"salt:{data_salt}"
        return salt_id is not _MISSING or salt is not _MISSING, None


class RequestSalts:
    """Block-hash seeds of TensorRT-LLM requests, through one leader core."""

    def __init__(self, core: KvbmLeaderCore) -> None:
        self.core = core
        # Whether this engine's RequestData carries cache_salt (TensorRT-LLM main does).
        self.request_data_has_salt = "cache_salt" in getattr(RequestData, "__dataclass_fields__", {})

    def salt_for(self, request: Any, data_salt: str | None = None) -> int | None:
        """The request's block-hash seed, or ``None`` while its tenant salt cannot be known."""
        is_known, cache_salt = RequestIdentity.cache_salt(request, data_salt)
        if not is_known and self.request_data_has_salt:
            return None  # the salt arrives later, in RequestData: nothing may match before
        return self.core.salt_for(SaltInputs(RequestIdentity.lora(request), cache_salt))
