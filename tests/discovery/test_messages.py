"""Wire formats: control messages, instance infos and event batches round-trip, and every
malformed or foreign payload raises MessageError (which receivers turn into a warning)."""

from __future__ import annotations

import json

import pytest

from kvbm_core import JobResult, KvLayout
from kvbm_core.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvbm_discovery import (
    Completions,
    InstanceInfo,
    MessageError,
    TierSizes,
    WorkerError,
    decode,
    decode_batch,
    encode,
    encode_batch,
)


def test_control_messages_round_trip() -> None:
    results = (
        JobResult(7, True, 4096, finished_at=1.5),
        JobResult(8, False, error="disk full", bad_block_hashes=(2**64 - 1, 3), finished_at=2.0),
    )
    for message in (Completions(3, results), WorkerError(1, "cuda OOM"), TierSizes({"cpu": 100, "disk": 0})):
        assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe not utf8",
        b"not json",
        b"[1, 2]",
        b'{"kind": "Completions", "rank": 0, "results": []}',  # no version marker: foreign
        b'{"kvbm": 1, "kind": "Reboot"}',
        b'{"kvbm": 1, "kind": "Completions", "rank": -1, "results": []}',
        b'{"kvbm": 1, "kind": "Completions", "rank": 0, "results": [{"job_id": 1}]}',
        b'{"kvbm": 1, "kind": "Completions", "rank": 0, "results": [{"job_id": 1, "ok": "yes"}]}',
        b'{"kvbm": 1, "kind": "Completions", "rank": 0, "results": [{"job_id": 1, "ok": true, '
        b'"bad_block_hashes": [18446744073709551616]}]}',
        b'{"kvbm": 1, "kind": "Completions", "rank": true, "results": []}',
        b'{"kvbm": 1, "kind": "TierSizes", "num_slots": {"cpu": -5}}',
        b'{"kvbm": 1, "kind": "WorkerError", "rank": 0, "error": 5}',
    ],
)
def test_malformed_control_messages_are_rejected(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,  # a RecursionError inside json before the bounds
        b'{"a":' * 100_000,
        b'{"kvbm": 1, "kind": "WorkerError", "rank": 0, "error": "' + b"x" * (9 * 1024 * 1024) + b'"}',
        b'{"kvbm": 1, "kind": "StoredBlocks", "rank": 0, "tier": "../../etc", "blocks": []}',
        b'{"kvbm": 1, "kind": "TierSizes", "num_slots": {"cpu": 1099511627777}}',
        b'{"kvbm": 1, "kind": "TierSizes", "num_slots": {' + b", ".join(b'"t%d": 1' % i for i in range(33)) + b"}}",
    ],
)
def test_oversized_deep_and_out_of_bounds_messages_are_rejected(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode(payload)
    with pytest.raises(MessageError):
        InstanceInfo.from_json(payload)


def test_a_900kb_worker_error_is_clipped_when_made_sent_and_received() -> None:
    huge = "x" * 900_000
    assert len(WorkerError(1, huge).error) < 2100
    assert len(decode(encode(WorkerError(1, huge))).error) < 2100
    wire = b'{"kvbm": 1, "kind": "Completions", "rank": 0, "results": [{"job_id": 1, "ok": false, "error": "'
    received = decode(wire + b"y" * 900_000 + b'"}]}')
    assert len(received.results[0].error) < 2100 and received.results[0].error.endswith("cut)")


def test_instance_info_round_trip_with_layout() -> None:
    layout = KvLayout(num_layers=4, tokens_per_block=16, num_kv_heads=8, head_dim=64)
    info = InstanceInfo("worker", rank=1, world_size=2, bytes_per_block=layout.bytes_per_block, layout=layout,
                        metadata={"device": "cuda:1"})  # fmt: skip
    back = InstanceInfo.from_json(info.to_json())
    assert back == info
    assert back.instance_id == "worker-1"
    assert InstanceInfo("leader").instance_id == "leader"


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage",
        b'{"role": "worker", "rank": 0}',
        b'{"kvbm": 1, "role": "janitor", "rank": 0, "world_size": 1, "bytes_per_block": 0, '
        b'"host": "h", "pid": 1, "version": "x", "layout": null}',
        b'{"kvbm": 1, "role": "worker", "rank": "0", "world_size": 1, "bytes_per_block": 0, '
        b'"host": "h", "pid": 1, "version": "x", "layout": null}',
        b'{"kvbm": 1, "role": "worker", "rank": 0, "world_size": 1, "bytes_per_block": 0, '
        b'"host": "h", "pid": 1, "version": "x", "layout": {"num_layers": 0}}',
    ],
)
def test_malformed_instance_infos_are_rejected(payload: bytes) -> None:
    with pytest.raises(MessageError):
        InstanceInfo.from_json(payload)


def test_event_batches_round_trip_and_reject_bad_events() -> None:
    events = [
        BlockStored("cpu", (11, 12), 10, tuple(range(8)), 4),
        BlockRemoved("disk", (11,)),
        AllBlocksCleared(None),
    ]
    batch = decode_batch(encode_batch("ns", "w0", 5, events))
    assert (batch.namespace, batch.worker_id, batch.seq, batch.events) == ("ns", "w0", 5, tuple(events))
    wire = json.loads(encode_batch("ns", "w0", 0, events))
    assert wire["events"][0]["medium"] == "CPU_TIER1"
    wire["events"].append({"type": "BlockExploded"})
    with pytest.raises(MessageError, match="bad event"):
        decode_batch(json.dumps(wire))
    with pytest.raises(MessageError):
        decode_batch(b'{"kvbm": 1, "namespace": "ns", "worker_id": "w", "seq": -1, "events": []}')
