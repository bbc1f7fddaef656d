"""The executor's own block hash: the key of its prefix reuse and of ``RequestData.block_hashes``.

``block_hashes(tokens, tokens_per_block, lora_task_id, cache_salt_id) -> list[int]``: one 64-bit
hash per full block, each chained on the previous one, so a hash names the block's whole prefix.
As TensorRT-LLM's ``hash_v1_block_key`` (the 2026 hash-utils module, index id 52211798789), the
cache salt id is mixed into the first block's seed and the LoRA task id into every block. The
function itself is not TensorRT-LLM's (that is blake3 over its own byte layout) and is
deliberately not kvbm's either: a connector must not be able to depend on the engine hashing
the way kvbm does.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["block_hashes"]

_NONE = 0xFFFF_FFFF_FFFF_FFFF  # stands for an absent id inside the hashed bytes


def block_hashes(
    tokens: Sequence[int],
    tokens_per_block: int,
    lora_task_id: int | None = None,
    cache_salt_id: int | None = None,
) -> list[int]:
    lora = _NONE if lora_task_id is None else lora_task_id & _NONE
    parent = _NONE if cache_salt_id is None else cache_salt_id & _NONE
    hashes = []
    for start in range(0, len(tokens) - tokens_per_block + 1, tokens_per_block):
        block = tokens[start : start + tokens_per_block]
        data = struct.pack(f"<QQ{len(block)}q", parent, lora, *block)
        parent = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        hashes.append(parent)
    return hashes
