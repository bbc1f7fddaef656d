"""Restore messages in chunks: what a persistent tier of one rank holds after a restart, split
so no message exceeds the control channel's payload limit (workers and the leader).

Messages:
- :class:`StoredBlocksChunk` (worker -> leader): part ``chunk_index`` of ``num_chunks`` of one
  rank's blocks of one tier, for one ``restore_id`` (a fresh token per worker start, so parts
  of two starts never mix). Hashes travel packed as little-endian uint64 and slots as int32,
  both base64 in the JSON: 16 characters per block instead of ~30 for ``[hash, slot]``, and
  decoding is one array view, not one Python object per number.
- :class:`RestoreAck` (leader -> worker): the leader holds part ``chunk_index``; the sender's
  window (:mod:`kvbm_discovery.restore_sender`) moves on.

Operations: ``split_blocks(rank, tier, restore_id, blocks, max_payload_bytes)`` -> the chunks,
each encoding to at most ``max_payload_bytes``; ``chunk_to_wire`` / ``chunk_from_wire`` and
``ack_to_wire`` / ``ack_from_wire`` (used by :mod:`kvbm_discovery.messages`), which raise
:class:`MessageError` naming the bad field. A chunk is never empty unless it is the only one.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from kvbm_core.messages import RestoreAck, StoredBlocksChunk
from kvbm_discovery.errors import MessageError

__all__ = [
    "StoredBlocksChunk",
    "RestoreAck",
    "split_blocks",
    "new_restore_id",
    "chunk_to_wire",
    "chunk_from_wire",
    "ack_to_wire",
    "ack_from_wire",
    "MAX_CHUNKS",
    "MAX_SLOT",
]

_HASH = np.dtype("<u8")
_SLOT = np.dtype("<i4")
# JSON text per block: 8 hash + 4 slot bytes, base64 (4 characters per 3 bytes).
_WIRE_BYTES_PER_BLOCK = 16
# Room for the kind, rank, tier, ids and the signed envelope's header line.
_OVERHEAD_BYTES = 1024
MAX_CHUNKS = 1 << 20
MAX_SLOT = 2**31 - 1
_RESTORE_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


def new_restore_id() -> str:
    return secrets.token_hex(8)


def blocks_per_chunk(max_payload_bytes: int) -> int:
    """Blocks that fit one message of ``max_payload_bytes`` (at least one)."""
    num = (max_payload_bytes - _OVERHEAD_BYTES) // _WIRE_BYTES_PER_BLOCK
    if num < 1:
        raise ValueError(
            f"a control message limit of {max_payload_bytes} bytes cannot carry one restored block; "
            "raise nats-server's max_payload (at least 2 KiB)"
        )
    return num


def split_blocks(
    rank: int, tier: str, restore_id: str, blocks: Mapping[int, int], max_payload_bytes: int
) -> list[StoredBlocksChunk]:
    """``blocks`` (``{hash: slot}``) as chunks that each fit ``max_payload_bytes``."""
    hashes = np.fromiter(blocks.keys(), dtype=_HASH, count=len(blocks))
    slots = np.fromiter(blocks.values(), dtype=np.int64, count=len(blocks))
    if slots.size and (slots.min() < 0 or slots.max() > MAX_SLOT):
        raise ValueError(f"restored slots must be in [0, {MAX_SLOT}] (a tier of at most 2^31 blocks)")
    slots32 = slots.astype(_SLOT)
    step = blocks_per_chunk(max_payload_bytes)
    starts = range(0, max(len(blocks), 1), step)
    return [
        StoredBlocksChunk(rank, tier, restore_id, i, len(starts),
                          hashes[s : s + step].tobytes(), slots32[s : s + step].tobytes())
        for i, s in enumerate(starts)
    ]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, name: str, itemsize: int) -> bytes:
    if not isinstance(value, str):
        raise MessageError(f"StoredBlocksChunk.{name} must be a base64 string, got {value!r:.60}")
    try:
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"StoredBlocksChunk.{name} is not valid base64") from None
    if len(data) % itemsize:
        raise MessageError(f"StoredBlocksChunk.{name} is {len(data)} bytes, not a whole number of {itemsize}-byte items")
    return data


def chunk_to_wire(chunk: StoredBlocksChunk) -> dict[str, Any]:
    return {
        "rank": chunk.rank, "tier": chunk.tier, "restore_id": chunk.restore_id,
        "chunk_index": chunk.chunk_index, "num_chunks": chunk.num_chunks,
        "hashes": _b64(chunk.hashes), "slots": _b64(chunk.slots),
    }


def _restore_id(value: Any) -> str:
    if not isinstance(value, str) or not _RESTORE_ID.match(value):
        raise MessageError(f"restore_id must be 1-32 letters or digits, got {value!r:.60}")
    return value


def _index(value: Any, name: str, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise MessageError(f"{name} must be an integer in [0, {maximum}], got {value!r:.60}")
    return value


def chunk_from_wire(wire: dict[str, Any], rank: int, tier: str) -> StoredBlocksChunk:
    """The chunk in ``wire`` (``rank`` and ``tier`` already checked by the caller)."""
    num_chunks = _index(wire.get("num_chunks"), "num_chunks", MAX_CHUNKS)
    chunk_index = _index(wire.get("chunk_index"), "chunk_index", MAX_CHUNKS)
    if num_chunks < 1 or chunk_index >= num_chunks:
        raise MessageError(f"chunk_index {chunk_index} of num_chunks {num_chunks} is out of range")
    hashes = _unb64(wire.get("hashes"), "hashes", _HASH.itemsize)
    slots = _unb64(wire.get("slots"), "slots", _SLOT.itemsize)
    if len(hashes) // _HASH.itemsize != len(slots) // _SLOT.itemsize:
        raise MessageError("StoredBlocksChunk carries a different number of hashes and slots")
    chunk = StoredBlocksChunk(rank, tier, _restore_id(wire.get("restore_id")), chunk_index, num_chunks, hashes, slots)
    if chunk.num_blocks and int(chunk.slot_array().min()) < 0:
        raise MessageError("StoredBlocksChunk.slots must not be negative")
    return chunk


def ack_to_wire(ack: RestoreAck) -> dict[str, Any]:
    return {"rank": ack.rank, "tier": ack.tier, "restore_id": ack.restore_id, "chunk_index": ack.chunk_index}


def ack_from_wire(wire: dict[str, Any], rank: int, tier: str) -> RestoreAck:
    return RestoreAck(rank, tier, _restore_id(wire.get("restore_id")),
                      _index(wire.get("chunk_index"), "chunk_index", MAX_CHUNKS))
