"""Store keys of KV blocks: content-addressed, never instance-specific (any process).

A key names what the bytes are, so every engine serving the same model with the same block
shape computes the same key for the same prefix, and nothing else does:

    ``{namespace}/{model}/{bytes_per_rank}x{world_size}/{block_hash:016x}/{rank}``

- ``namespace``: the deployment's prefix (tier option ``mooncake_namespace``), so two fleets
  sharing one store never read each other's blocks;
- ``model``: a digest of the model identity (``KvbmConfig.model_id``);
- ``bytes_per_rank`` and ``world_size``: the shard shape (a TP-2 engine's shard is not a TP-1
  block); the full layout fingerprint is checked from each value's header;
- ``block_hash``: kvbm's chained block hash, salted with the model, LoRA and tenant salt, so
  tenants never share a key unless they share a salt;
- ``rank``: TP shards are keyed per shard; a block is a hit only when every shard is present.

Both the leader (existence queries) and the workers (puts and gets) build keys with the same
``KeyScheme``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

__all__ = ["KeyScheme"]


@dataclass(frozen=True)
class KeyScheme:
    namespace: str
    model_id: str | None
    bytes_per_rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not self.namespace or "/" in self.namespace:
            raise ValueError(
                f"mooncake_namespace={self.namespace!r} is invalid: expected a non-empty name "
                "without '/'"
            )

    @property
    def prefix(self) -> str:
        model = xxhash.xxh3_64_hexdigest((self.model_id or "").encode())
        return f"{self.namespace}/{model}/{self.bytes_per_rank}x{self.world_size}"

    def key(self, block_hash: int, rank: int) -> str:
        return f"{self.prefix}/{block_hash & 0xFFFFFFFFFFFFFFFF:016x}/{rank}"

    def keys(self, block_hashes: Sequence[int], rank: int) -> list[str]:
        prefix = self.prefix
        return [f"{prefix}/{h & 0xFFFFFFFFFFFFFFFF:016x}/{rank}" for h in block_hashes]

    def all_shards(self, block_hashes: Sequence[int]) -> list[str]:
        """Every rank's key of every block, block by block (rank-minor)."""
        prefix = self.prefix
        return [
            f"{prefix}/{h & 0xFFFFFFFFFFFFFFFF:016x}/{rank}"
            for h in block_hashes
            for rank in range(self.world_size)
        ]
