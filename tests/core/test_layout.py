"""KvLayout: sizes of one block, its GPU arrangement, tensor-parallel shards, pool shapes."""

from __future__ import annotations

import pytest

from kvbm_core.layout import KvLayout, LayoutKind, dtype_size

LLAMA_8B = KvLayout(num_layers=32, tokens_per_block=32, num_kv_heads=8, head_dim=128)


def test_sizes_of_a_llama_8b_block() -> None:
    assert LLAMA_8B.dtype_bytes == 2
    assert LLAMA_8B.elements_per_region == 8 * 32 * 128
    assert LLAMA_8B.bytes_per_region == 65536
    assert LLAMA_8B.bytes_per_layer == 2 * 65536
    assert LLAMA_8B.bytes_per_block == 32 * 2 * 65536  # 4 MiB
    assert LLAMA_8B.bytes_per_token == 131072
    assert LLAMA_8B.num_blocks_for_bytes(10 * 2**22 + 5) == 10


def test_mla_has_one_kv_region() -> None:
    mla = KvLayout(num_layers=4, tokens_per_block=16, num_kv_heads=1, head_dim=576, kv_factor=1)
    assert mla.bytes_per_layer == mla.bytes_per_region == 16 * 576 * 2


def test_pieces_per_block_follow_the_arrangement() -> None:
    assert LLAMA_8B.num_pieces == 1
    separate = KvLayout(32, 32, 8, 128, kind=LayoutKind.LAYER_SEPARATE)
    assert separate.num_pieces == 32
    assert separate.bytes_per_block == LLAMA_8B.bytes_per_block


def test_kind_and_dtype_accept_their_spellings() -> None:
    layout = KvLayout(2, 4, 2, 8, dtype="torch.float16", kind="layer_separate")
    assert layout.dtype == "float16" and layout.kind is LayoutKind.LAYER_SEPARATE
    assert layout == KvLayout(2, 4, 2, 8, dtype="float16", kind=LayoutKind.LAYER_SEPARATE)


@pytest.mark.parametrize(
    ("dtype", "size"), [("float32", 4), ("bfloat16", 2), ("float8_e4m3fn", 1), ("torch.int8", 1)]
)
def test_dtype_sizes(dtype: str, size: int) -> None:
    assert dtype_size(dtype) == size


def test_unsupported_dtype_lists_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"'complex64'.*accepted: .*bfloat16"):
        KvLayout(2, 4, 2, 8, dtype="complex64")


@pytest.mark.parametrize("field", ["num_layers", "tokens_per_block", "num_kv_heads", "head_dim"])
def test_sizes_must_be_positive(field: str) -> None:
    values = {"num_layers": 2, "tokens_per_block": 4, "num_kv_heads": 2, "head_dim": 8, field: 0}
    with pytest.raises(ValueError, match=f"KvLayout.{field} must be positive, got 0"):
        KvLayout(**values)


def test_kv_factor_is_one_or_two() -> None:
    with pytest.raises(ValueError, match="kv_factor"):
        KvLayout(2, 4, 2, 8, kv_factor=3)


def test_shard_splits_kv_heads_over_ranks() -> None:
    shard = LLAMA_8B.shard(4)
    assert shard.num_kv_heads == 2
    assert shard.bytes_per_block * 4 == LLAMA_8B.bytes_per_block
    assert LLAMA_8B.shard(1) == LLAMA_8B


@pytest.mark.parametrize("tp_size", [0, 3, 16])
def test_shard_rejects_uneven_splits(tp_size: int) -> None:
    with pytest.raises(
        ValueError, match=f"cannot split 8 KV heads over tensor-parallel size {tp_size}"
    ):
        LLAMA_8B.shard(tp_size)


def test_from_trtllm_pool_shape() -> None:
    layout = KvLayout.from_pool_shape(
        [100, 32, 2, 8 * 32 * 128], tokens_per_block=32, head_dim=128, dtype="bfloat16"
    )
    assert layout == LLAMA_8B
    nested = KvLayout.from_pool_shape(
        [100, 32, 2, 8, 32 * 128], tokens_per_block=32, head_dim=128, dtype="bfloat16"
    )
    assert nested == LLAMA_8B


def test_from_pool_shape_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected a pool of shape"):
        KvLayout.from_pool_shape([100, 32, 2], 32, 128, "bfloat16")
    with pytest.raises(ValueError, match="not heads x 32 tokens x 128 head_dim"):
        KvLayout.from_pool_shape([100, 32, 2, 1000], 32, 128, "bfloat16")


def test_layouts_are_hashable_values() -> None:
    assert len({LLAMA_8B, KvLayout(32, 32, 8, 128), LLAMA_8B.shard(2)}) == 2
