"""What, besides its tokens, separates one request's blocks from another's: its salt inputs.

An engine adapter reads them off its own request object (TensorRT-LLM's ``lora_task_id`` and
``cache_salt_id``: :mod:`kvbm_trtllm.request_identity`) and hands them to
``KvbmLeaderCore.salt_for``, which mixes in the model identity (:func:`kvbm_core.hashing.salt_hash`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SaltInputs"]


@dataclass(frozen=True)
class SaltInputs:
    """The salt inputs of one request, as stable text keys.

    Args:
        lora: the LoRA adapter's key (e.g. ``"task:3"``), ``None`` for the base model.
        cache_salt: the tenant's key (e.g. ``"id:12345"``), ``None`` when the request has none.
    """

    lora: str | None = None
    cache_salt: str | None = None
