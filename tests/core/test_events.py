"""KV events: Dynamo's wire dicts, round trips, and malformed wire rejected."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbm_core.events import AllBlocksCleared, BlockRemoved, BlockStored, ListSink, event_from_wire

STORED = BlockStored(
    "cpu", (11, 12), parent_hash=10, token_ids=tuple(range(8)), block_size=4, lora_name="ad"
)


def test_block_stored_wire_is_dynamos() -> None:
    assert STORED.to_wire() == {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": 10,
        "token_ids": list(range(8)),
        "block_size": 4,
        "lora_name": "ad",
        "medium": "CPU_TIER1",
    }


@pytest.mark.parametrize(
    ("medium", "wire"),
    [("gpu", "GPU"), ("cpu", "CPU_TIER1"), ("disk", "CPU_TIER2"), ("mmap", "MMAP")],
)
def test_media_names_on_the_wire(medium: str, wire: str) -> None:
    event = BlockRemoved(medium, (1,))
    assert event.to_wire()["medium"] == wire
    assert event_from_wire(event.to_wire()) == event


@pytest.mark.parametrize(
    "event",
    [
        STORED,
        BlockStored("disk", (1,), None, (1, 2), 2),
        BlockRemoved("disk", (5, 6)),
        AllBlocksCleared("cpu"),
        AllBlocksCleared(),
    ],
)
def test_wire_round_trip_through_json(event: Any) -> None:
    assert event_from_wire(json.loads(json.dumps(event.to_wire()))) == event


def test_cleared_without_medium_has_no_medium_key() -> None:
    assert AllBlocksCleared().to_wire() == {"type": "AllBlocksCleared"}


u64 = st.integers(0, 2**64 - 1)


@given(
    st.sampled_from(["gpu", "cpu", "disk", "nvme-shared"]),
    st.lists(u64, max_size=8),
    st.none() | u64,
    st.lists(st.integers(0, 2**32 - 1), max_size=32),
    st.integers(1, 128),
    st.none() | st.text(max_size=8),
)
def test_any_block_stored_round_trips(medium, hashes, parent, tokens, block_size, lora) -> None:  # type: ignore[no-untyped-def]
    event = BlockStored(medium, tuple(hashes), parent, tuple(tokens), block_size, lora)
    assert event_from_wire(json.loads(json.dumps(event.to_wire()))) == event


def _stored_wire(**changes: Any) -> dict[str, Any]:
    wire = STORED.to_wire()
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not ...}


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ([1, 2], "an event must be an object, got list"),
        ({"type": "BlockEvicted"}, "unknown event type 'BlockEvicted'"),
        ({}, "unknown event type None"),
        (_stored_wire(block_hashes=...), "malformed BlockStored event: missing 'block_hashes'"),
        (_stored_wire(token_ids=...), "missing 'token_ids'"),
        (_stored_wire(block_size=...), "missing 'block_size'"),
        (_stored_wire(block_hashes="123"), "block_hashes must be a list, got str"),
        (_stored_wire(block_hashes=None), "block_hashes must be a list"),
        (_stored_wire(block_hashes=["x"]), "block_hashes holds 'x'"),
        (_stored_wire(block_hashes=[-1]), "block_hashes holds -1"),
        (_stored_wire(block_hashes=[2**64]), "block_hashes holds"),
        (_stored_wire(parent_block_hash="10"), "parent_block_hash holds '10'"),
        (_stored_wire(token_ids=[1.5]), "token_ids holds 1.5"),
        (_stored_wire(block_size=0), "block_size must be > 0"),
        (_stored_wire(block_size=True), "block_size holds True"),
        (_stored_wire(lora_name=3), "lora_name must be a string or null"),
        (_stored_wire(medium=7), "medium must be a tier name"),
        (
            {"type": "BlockRemoved", "block_hashes": 5},
            "malformed BlockRemoved event: block_hashes must be a list",
        ),
        ({"type": "BlockRemoved"}, "missing 'block_hashes'"),
    ],
)
def test_malformed_wire_raises_value_error(wire: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        event_from_wire(wire)
    assert message in str(caught.value)


def test_list_sink_keeps_every_event_in_order() -> None:
    sink = ListSink()
    sink.publish([STORED])
    sink.publish([BlockRemoved("cpu", (11,)), AllBlocksCleared("cpu")])
    sink.close()
    assert [type(e).__name__ for e in sink.events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]
    assert sink.as_dicts()[1] == {"medium": "cpu", "block_hashes": (11,)}
