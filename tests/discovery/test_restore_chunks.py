"""Restores of any size: a rank's ``{hash: slot}`` travels in acknowledged parts under the
channel's payload limit, and the leader applies what every rank holds once all parts arrived.

The NATS tests run a real nats-server at its default ``max_payload`` (1 MiB): one
``StoredBlocks`` of 100,000 blocks (~3 MB of JSON) never arrives there.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from kvbm_discovery import (
    InProcControlChannel,
    MessageError,
    RestoreAck,
    StoredBlocksChunk,
    decode,
    encode,
)
from kvbm_discovery.control import ControlChannel, Inbox
from kvbm_discovery.restore_assembly import RestoreAssembly
from kvbm_discovery.restore_chunks import split_blocks
from kvbm_discovery.restore_sender import send_restore

MIB = 1024 * 1024


def _blocks(num: int, seed: int) -> dict[int, int]:
    rng = random.Random(seed)
    return {rng.getrandbits(64): slot for slot in range(num)}


# ---- the wire form --------------------------------------------------------------------------


def test_chunks_fit_the_limit_and_decode_to_the_same_blocks():
    blocks = _blocks(100_000, 1)
    chunks = split_blocks(1, "disk", "r1", blocks, MIB)
    wires = [encode(c) for c in chunks]
    assert len(chunks) == 2 and max(len(w) for w in wires) <= MIB - 512  # room for the envelope
    decoded = [decode(w) for w in wires]
    assert decoded == chunks
    got = {h: s for c in decoded for h, s in zip(c.hash_array().tolist(), c.slot_array().tolist(), strict=True)}
    assert got == blocks
    assert [(c.chunk_index, c.num_chunks) for c in decoded] == [(0, 2), (1, 2)]


def test_no_blocks_is_one_empty_chunk():
    (chunk,) = split_blocks(0, "disk", "r1", {}, MIB)
    assert decode(encode(chunk)) == chunk and chunk.num_blocks == 0 and chunk.num_chunks == 1


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"hashes": "not base64!"}, "base64"),
        ({"hashes": "AAAA"}, "whole number"),
        ({"slots": "AAAAAAAAAAA="}, "different number"),
        ({"slots": "/////w=="}, "negative"),
        ({"chunk_index": 2}, "out of range"),
        ({"num_chunks": 0}, "out of range"),
        ({"restore_id": "../x"}, "restore_id"),
    ],
)
def test_malformed_chunks_are_refused_naming_the_field(change, named):
    import json

    wire = json.loads(encode(StoredBlocksChunk(0, "disk", "r1", 1, 2, b"\0" * 8, b"\0" * 4)))
    with pytest.raises(MessageError, match=named):
        decode(json.dumps({**wire, **change}))


def test_a_slot_beyond_int32_is_a_clear_error():
    with pytest.raises(ValueError, match="2\\^31"):
        split_blocks(0, "disk", "r1", {5: 2**31}, MIB)


# ---- the leader's assembly ------------------------------------------------------------------


def _assemble(assembly: RestoreAssembly, rank: int, blocks: dict[int, int], limit: int = 64 * 1024) -> None:
    for chunk in split_blocks(rank, "disk", f"r{rank}", blocks, limit):
        assert assembly.add(chunk, num_slots=1 << 20)


def test_blocks_are_applied_only_when_every_part_of_every_rank_is_in():
    assembly = RestoreAssembly(world_size=2)
    rank0 = _blocks(20_000, 2)
    rank1 = dict(rank0)
    moved, dropped = list(rank0)[:10], list(rank0)[10:15]
    for h in moved:
        rank1[h] += 1  # another slot on rank 1: neither copy is trusted
    for h in dropped:
        del rank1[h]
    rank1[12345] = 7  # only rank 1 has it
    _assemble(assembly, 0, rank0)
    chunks1 = split_blocks(1, "disk", "r1", rank1, 64 * 1024)
    for chunk in chunks1[:-1]:
        assembly.add(chunk, num_slots=1 << 20)
        assert assembly.take_complete("disk") is None
    assembly.add(chunks1[-1], num_slots=1 << 20)
    common = assembly.take_complete("disk")
    assert common == {h: s for h, s in rank0.items() if h not in moved and h not in dropped}
    assert assembly.num_pending == 0


def test_repeated_parts_count_once_and_a_new_restore_id_replaces_the_old_parts():
    assembly = RestoreAssembly(world_size=1)
    first = split_blocks(0, "disk", "old", _blocks(3000, 3), 16 * 1024)
    assembly.add(first[0], 1 << 20)
    assembly.add(first[0], 1 << 20)
    fresh = _blocks(10, 4)
    (again,) = split_blocks(0, "disk", "new", fresh, 16 * 1024)  # the worker started again
    assembly.add(again, 1 << 20)
    assert assembly.take_complete("disk") == fresh


def test_more_blocks_than_slots_is_refused():
    assembly = RestoreAssembly(world_size=1)
    (chunk,) = split_blocks(0, "disk", "r0", _blocks(100, 5), MIB)
    assert not assembly.add(chunk, num_slots=99)
    assert assembly.take_complete("disk") is None


def test_an_incomplete_restore_expires_naming_what_is_missing():
    assembly = RestoreAssembly(world_size=3, timeout_secs=0.05)
    chunks = split_blocks(0, "disk", "r0", _blocks(5000, 6), 16 * 1024)
    assembly.add(chunks[0], 1 << 20)
    _assemble(assembly, 1, _blocks(10, 7))
    assert assembly.take_expired() == []
    time.sleep(0.1)
    (failure,) = assembly.take_expired()
    assert failure.tier == "disk"
    assert failure.missing == f"rank 0: 1 of {len(chunks)} chunks; rank 2: nothing"
    assert assembly.num_pending == 0 and assembly.take_complete("disk") is None


# ---- end to end over a channel --------------------------------------------------------------


class Leader:
    """A leader loop as the connector's: drain the inbox, keep parts, acknowledge them."""

    def __init__(self, control: ControlChannel, inbox: Inbox, world_size: int, drop_first: int | None = None) -> None:
        self.control, self.inbox = control, inbox
        self.assembly = RestoreAssembly(world_size)
        self.restored: dict[int, int] | None = None
        self.max_queued = 0
        self.drop_first = drop_first  # lose this chunk index once (a lost message)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_queued = max(self.max_queued, len(self.inbox))
            chunk = self.inbox.get(0.05)
            if not isinstance(chunk, StoredBlocksChunk):
                continue
            if chunk.chunk_index == self.drop_first:
                self.drop_first = None
                continue
            assert self.assembly.add(chunk, num_slots=1 << 24)
            self.control.send_to_worker(chunk.rank, RestoreAck(chunk.rank, chunk.tier, chunk.restore_id, chunk.chunk_index))
            common = self.assembly.take_complete(chunk.tier)
            if common is not None:
                self.restored = common

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _restore_from_ranks(leader_channel, worker_channels, per_rank, **kwargs):
    leader = Leader(leader_channel, leader_channel.leader_inbox(), len(worker_channels), kwargs.pop("drop_first", None))
    inboxes = [c.worker_inbox(rank) for rank, c in enumerate(worker_channels)]
    reports = [None] * len(worker_channels)

    def send(rank: int) -> None:
        reports[rank] = send_restore(worker_channels[rank], inboxes[rank], rank, "disk", per_rank[rank], 60, **kwargs)

    threads = [threading.Thread(target=send, args=(r,)) for r in range(len(worker_channels))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    leader.stop()
    return leader, reports


def test_in_process_restore_in_a_window_of_parts_and_a_lost_part_is_sent_again(namespace):
    control = InProcControlChannel(namespace)
    blocks = _blocks(50_000, 8)
    leader, (report,) = _restore_from_ranks(control, [control], [blocks], drop_first=3, resend_secs=0.3,
                                            max_payload_bytes=64 * 1024)  # fmt: skip
    assert report.is_complete and report.num_chunks == 13 and report.num_resent >= 1
    assert leader.restored == blocks
    assert leader.max_queued <= (4 * MIB) // (64 * 1024), "the window bounds what waits in the inbox"


@pytest.mark.services
def test_two_ranks_of_100000_blocks_restore_over_nats_at_its_default_max_payload(shared_nats, namespace, config_factory):
    from kvbm_discovery.nats_control import NatsControlChannel

    config = config_factory(namespace, nats=shared_nats)
    leader_channel = NatsControlChannel(config)
    workers = [NatsControlChannel(config) for _ in range(2)]
    rank0 = _blocks(150_000, 9)
    rank1 = dict(rank0)
    del rank1[next(iter(rank0))]
    try:
        assert workers[0].max_payload_bytes == MIB, "nats-server's default max_payload"
        leader, reports = _restore_from_ranks(leader_channel, workers, [rank0, rank1])
    finally:
        for channel in (*workers, leader_channel):
            channel.close()
    assert all(r is not None and r.is_complete and r.num_chunks == 3 for r in reports)
    assert leader.restored == rank1
    assert all(c.num_undelivered == 0 for c in workers)


def test_nothing_acknowledged_ends_within_the_timeout_with_an_incomplete_report(namespace):
    control = InProcControlChannel(namespace)
    inbox = control.worker_inbox(0)
    started = time.monotonic()
    report = send_restore(control, inbox, 0, "disk", _blocks(10, 10), timeout_secs=0.3)
    assert time.monotonic() - started < 5
    assert not report.is_complete and report.num_acked == 0 and report.num_chunks == 1
