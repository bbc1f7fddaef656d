"""Block identity: Dynamo v1-compatible chained block hashes.

Operations (leader process):
- ``salt_hash(model_id, lora_name, cache_salt)``: the seed every block hash of a request uses.
  With all three unset it equals Dynamo v1's TensorRT-LLM salt (the JSON ``{}``).
- ``block_hashes(token_ids, block_size, salt, parent_hash=None)``: one sequence hash per
  *full* block; a trailing partial block is never hashed.

Scheme (Dynamo v1): ``local = xxh3_64(u32-LE tokens of the block, seed=salt)``; the first
block's sequence hash is ``local``; later ones are ``xxh3_64(LE u64 [parent, local],
seed=salt)``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from itertools import accumulate

import numpy as np
import xxhash

__all__ = ["salt_hash", "block_hashes", "num_full_blocks"]

_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack


def salt_hash(
    model_id: str | None = None, lora_name: str | None = None, cache_salt: str | None = None
) -> int:
    """Seed for a request's block hashes, covering model, LoRA adapter and tenant salt.

    The JSON keys follow Dynamo's ``KvbmRequest`` (``salt``, ``lora_name``) with unset fields
    left out, so a request with none of them hashes exactly as Dynamo v1 does on TensorRT-LLM.
    """
    fields: dict[str, str] = {}
    if cache_salt is not None:
        fields["salt"] = cache_salt
    if lora_name is not None:
        fields["lora_name"] = lora_name
    if model_id is not None:
        fields["model"] = model_id
    return _xxh3(json.dumps(fields, separators=(",", ":")).encode(), 0)


def num_full_blocks(num_tokens: int, block_size: int) -> int:
    return num_tokens // block_size


def block_hashes(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    salt: int,
    parent_hash: int | None = None,
) -> list[int]:
    """Chained sequence hashes of the full blocks of ``token_ids``.

    ``parent_hash`` continues a chain: pass the last hash already computed and only the tokens
    after it (still starting on a block boundary).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens = np.ascontiguousarray(token_ids, dtype="<u4")
    num_blocks = len(tokens) // block_size
    if num_blocks == 0:
        return []
    rows = tokens[: num_blocks * block_size].reshape(num_blocks, block_size)
    local_hashes = [_xxh3(row, salt) for row in rows]
    chain = lambda parent, local: _xxh3(_pack_pair(parent, local), salt)  # noqa: E731
    if parent_hash is None:
        return list(accumulate(local_hashes, chain))
    return list(accumulate(local_hashes, chain, initial=parent_hash))[1:]
