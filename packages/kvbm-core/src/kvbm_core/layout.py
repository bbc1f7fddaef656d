"""What one KV block's bytes are.

A ``KvLayout`` describes one block as it lives in a tier: ``num_layers`` x ``kv_factor`` x
``num_kv_heads * tokens_per_block * head_dim`` elements of ``dtype``. Two arrangements:

- ``FULLY_CONTIGUOUS`` (TensorRT-LLM's primary pool, ``[blocks, layers, kv, H*T*D]``): a block
  is one contiguous run of ``bytes_per_block`` bytes.
- ``LAYER_SEPARATE`` (one tensor per layer, ``[blocks, kv, H*T*D]`` each, as vLLM-style
  engines keep it): a block is ``num_layers`` runs of ``bytes_per_layer`` bytes, one per layer
  tensor.

Tiers below the GPU always store a block contiguously; handlers gather/scatter the pieces.
Under tensor parallelism every rank keeps ``shard(tp_size)``: its own KV heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

__all__ = ["KvLayout", "LayoutKind", "dtype_size"]

_DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


def dtype_size(dtype: str) -> int:
    name = str(dtype).removeprefix("torch.")
    try:
        return _DTYPE_SIZES[name]
    except KeyError:
        raise ValueError(
            f"unsupported KV dtype {dtype!r}; accepted: {', '.join(sorted(_DTYPE_SIZES))}"
        ) from None


class LayoutKind(StrEnum):
    FULLY_CONTIGUOUS = "fully_contiguous"
    LAYER_SEPARATE = "layer_separate"


@dataclass(frozen=True, slots=True)
class KvLayout:
    num_layers: int
    tokens_per_block: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    kv_factor: int = 2
    kind: LayoutKind = LayoutKind.FULLY_CONTIGUOUS

    def __post_init__(self) -> None:
        for name in ("num_layers", "tokens_per_block", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KvLayout.{name} must be positive, got {getattr(self, name)}")
        if self.kv_factor not in (1, 2):
            raise ValueError(f"KvLayout.kv_factor must be 1 (MLA) or 2 (K,V), got {self.kv_factor}")
        object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        object.__setattr__(self, "kind", LayoutKind(self.kind))
        dtype_size(self.dtype)

    @property
    def dtype_bytes(self) -> int:
        return dtype_size(self.dtype)

    @property
    def elements_per_region(self) -> int:
        """Elements of one (layer, K-or-V) region: heads x tokens x head_dim."""
        return self.num_kv_heads * self.tokens_per_block * self.head_dim

    @property
    def bytes_per_region(self) -> int:
        return self.elements_per_region * self.dtype_bytes

    @property
    def bytes_per_layer(self) -> int:
        return self.bytes_per_region * self.kv_factor

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_layer * self.num_layers

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.tokens_per_block

    @property
    def num_pieces(self) -> int:
        """Contiguous runs one block occupies in GPU memory."""
        return 1 if self.kind is LayoutKind.FULLY_CONTIGUOUS else self.num_layers

    def shard(self, tp_size: int) -> KvLayout:
        """The layout one rank holds when KV heads are split over ``tp_size`` ranks."""
        if tp_size <= 0 or self.num_kv_heads % tp_size:
            raise ValueError(
                f"cannot split {self.num_kv_heads} KV heads over tensor-parallel size {tp_size}"
            )
        return replace(self, num_kv_heads=self.num_kv_heads // tp_size)

    @classmethod
    def from_pool_shape(
        cls, shape: Sequence[int], tokens_per_block: int, head_dim: int, dtype: str
    ) -> KvLayout:
        """Layout of a TensorRT-LLM primary pool ``[num_blocks, num_layers, kv, H*T*D]``."""
        if len(shape) < 4:
            raise ValueError(f"expected a pool of shape [blocks, layers, kv, ...], got {list(shape)}")
        inner = math.prod(shape[3:])
        if inner % (tokens_per_block * head_dim):
            raise ValueError(
                f"pool inner size {inner} is not heads x {tokens_per_block} tokens x {head_dim} head_dim"
            )
        return cls(
            num_layers=shape[1],
            kv_factor=shape[2],
            tokens_per_block=tokens_per_block,
            num_kv_heads=inner // (tokens_per_block * head_dim),
            head_dim=head_dim,
            dtype=dtype,
        )

    def num_blocks_for_bytes(self, num_bytes: float) -> int:
        return int(num_bytes // self.bytes_per_block)
