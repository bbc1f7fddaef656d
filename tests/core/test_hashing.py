"""Block identity: Dynamo v1's chained xxh3 block hashes and the request salt."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvbm_core.hashing import block_hashes, num_full_blocks, salt_hash

# Dynamo v1 on TensorRT-LLM: tokens 1..10, block size 4, seed 1337.
DYNAMO_VECTOR = [14643705804678351452, 4945711292740353085]
DYNAMO_EMPTY_SALT = 1389868326933519382

tokens_st = st.lists(st.integers(0, 2**32 - 1), max_size=200)
block_size_st = st.integers(1, 16)
salt_st = st.integers(0, 2**64 - 1)


def reference_hashes(tokens: list[int], block_size: int, salt: int) -> list[int]:
    """Dynamo v1's scheme written out longhand, one block at a time."""
    hashes: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = struct.pack(f"<{block_size}I", *tokens[start : start + block_size])
        local = xxhash.xxh3_64_intdigest(block, salt)
        if hashes:
            local = xxhash.xxh3_64_intdigest(struct.pack("<QQ", hashes[-1], local), salt)
        hashes.append(local)
    return hashes


def test_dynamo_test_vector() -> None:
    assert block_hashes(list(range(1, 11)), 4, 1337) == DYNAMO_VECTOR


def test_salt_with_nothing_set_is_dynamos_trtllm_salt() -> None:
    assert salt_hash() == DYNAMO_EMPTY_SALT
    assert salt_hash() == xxhash.xxh3_64_intdigest(b"{}", 0)


def test_only_full_blocks_are_hashed() -> None:
    assert block_hashes(list(range(1, 9)), 4, 1337) == DYNAMO_VECTOR
    assert block_hashes(list(range(1, 4)), 4, 1337) == []
    assert block_hashes([], 4, 1337) == []
    assert num_full_blocks(10, 4) == 2


def test_parent_continuation_equals_whole_chain() -> None:
    tokens = list(range(1, 11))
    first = block_hashes(tokens[:4], 4, 1337)
    assert block_hashes(tokens[4:], 4, 1337, parent_hash=first[-1]) == DYNAMO_VECTOR[1:]


def test_numpy_and_list_inputs_agree() -> None:
    tokens = list(range(1000, 1100))
    for array in (np.array(tokens, dtype=np.int64), np.array(tokens, dtype=np.uint32)):
        assert block_hashes(array, 8, 7) == block_hashes(tokens, 8, 7)


@pytest.mark.parametrize("block_size", [0, -4])
def test_block_size_must_be_positive(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2, 3], block_size, 0)


def test_model_lora_and_salt_each_change_the_seed() -> None:
    salts = {
        salt_hash(),
        salt_hash(model_id="llama"),
        salt_hash(model_id="qwen"),
        salt_hash(lora_name="llama"),
        salt_hash(cache_salt="llama"),
        salt_hash(model_id="llama", lora_name="a"),
        salt_hash(model_id="llama", lora_name="a", cache_salt="tenant-1"),
    }
    assert len(salts) == 7
    tokens = list(range(64))
    assert len({tuple(block_hashes(tokens, 16, s)) for s in salts}) == 7


def test_salt_is_the_json_of_the_set_fields() -> None:
    expected = json.dumps({"salt": "t", "lora_name": "l", "model": "m"}, separators=(",", ":"))
    assert salt_hash("m", "l", "t") == xxhash.xxh3_64_intdigest(expected.encode(), 0)
    assert salt_hash("m", "l", "t") == salt_hash(model_id="m", lora_name="l", cache_salt="t")


@given(tokens_st, block_size_st, salt_st)
def test_matches_the_longhand_scheme(tokens: list[int], block_size: int, salt: int) -> None:
    assert block_hashes(tokens, block_size, salt) == reference_hashes(tokens, block_size, salt)


@given(tokens_st, block_size_st, salt_st, st.integers(0, 20))
def test_continuing_at_any_block_boundary_equals_whole_chain(
    tokens: list[int], block_size: int, salt: int, num_prefix_blocks: int
) -> None:
    whole = block_hashes(tokens, block_size, salt)
    cut = min(num_prefix_blocks, len(whole)) * block_size
    head = block_hashes(tokens[:cut], block_size, salt)
    parent = head[-1] if head else None
    assert head + block_hashes(tokens[cut:], block_size, salt, parent_hash=parent) == whole


@given(tokens_st, block_size_st, salt_st)
def test_prefix_blocks_keep_their_hashes(tokens: list[int], block_size: int, salt: int) -> None:
    whole = block_hashes(tokens, block_size, salt)
    assert len(whole) == len(tokens) // block_size
    for num_blocks in range(len(whole) + 1):
        assert (
            block_hashes(tokens[: num_blocks * block_size], block_size, salt) == whole[:num_blocks]
        )


@given(st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=64), st.data())
def test_changing_a_token_changes_its_block_and_every_later_one(
    tokens: list[int], data: st.DataObject
) -> None:
    block_size = 4
    index = data.draw(st.integers(0, len(tokens) // block_size * block_size - 1))
    changed = list(tokens)
    changed[index] = (changed[index] + 1) % 2**32
    before, after = block_hashes(tokens, block_size, 1), block_hashes(changed, block_size, 1)
    first_changed = index // block_size
    assert before[:first_changed] == after[:first_changed]
    assert all(b != a for b, a in zip(before[first_changed:], after[first_changed:], strict=True))


@pytest.mark.parametrize("bad", [[1, 2, 3, -1], [1, 2, 3, 2**32], [1.0, 2, 3, 4]])
def test_tokens_that_are_not_u32_are_refused(bad: list) -> None:
    with pytest.raises((OverflowError, TypeError)):
        block_hashes(bad, 4, 0)


def test_tuples_and_lists_of_numpy_ints_hash_alike() -> None:
    tokens = list(range(1, 11))
    assert block_hashes(tuple(tokens), 4, 1337) == DYNAMO_VECTOR
    assert block_hashes([np.int64(t) for t in tokens], 4, 1337) == DYNAMO_VECTOR
