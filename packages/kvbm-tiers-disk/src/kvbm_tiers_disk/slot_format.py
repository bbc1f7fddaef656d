"""What one slot of a disk tier file holds, byte for byte.

A slot is a 4 KiB header followed by the block's bytes padded to 4 KiB, so every slot, header
and payload starts on a 4 KiB boundary (what O_DIRECT needs). Slot ``s`` starts at
``s * stride``. Header and payload are written by one ``pwritev``; the header names the slot,
the block hash and the xxh3_64 of the payload, so a torn write, a stale index entry, a
misdirected write or a flipped bit is caught when the block is read.

Header (little endian, the rest of the 4 KiB is zero)::

    magic      8s   b"KVBMSLT1"
    version    u32  FORMAT_VERSION
    flags      u32  0
    fingerprint u64 layout fingerprint (see ``layout_fingerprint``)
    slot       u64
    block_hash u64
    num_bytes  u64  payload bytes (``layout.bytes_per_block``), without padding
    checksum   u64  xxh3_64 of the payload
    header_checksum u64  xxh3_64 of the 64 bytes before it

Operations (worker process, any thread): ``SlotGeometry`` (sizes and offsets),
``layout_fingerprint``, ``payload_checksum``, ``pack_header``, ``check_header``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Buffer

from kvbm_core.layout import KvLayout

__all__ = [
    "ALIGN",
    "HEADER_BYTES",
    "FORMAT_VERSION",
    "MAX_HASH",
    "SlotGeometry",
    "SlotHeader",
    "layout_fingerprint",
    "payload_checksum",
    "pack_header",
    "unpack_header",
    "check_header",
]

ALIGN = 4096
HEADER_BYTES = ALIGN
FORMAT_VERSION = 1
MAX_HASH = (1 << 64) - 1
_MAGIC = b"KVBMSLT1"
_FIELDS = struct.Struct("<8sIIQQQQQ")
_HEADER_CHECKSUM = struct.Struct("<Q")


def round_up(num_bytes: int, align: int = ALIGN) -> int:
    return -(-num_bytes // align) * align


@dataclass(frozen=True, slots=True)
class SlotGeometry:
    bytes_per_block: int

    @property
    def payload_bytes(self) -> int:
        """Payload size on disk: the block padded to ``ALIGN``."""
        return round_up(self.bytes_per_block)

    @property
    def stride(self) -> int:
        return HEADER_BYTES + self.payload_bytes

    def offset(self, slot: int) -> int:
        return slot * self.stride

    def file_bytes(self, num_slots: int) -> int:
        return num_slots * self.stride


@dataclass(frozen=True, slots=True)
class SlotHeader:
    fingerprint: int
    slot: int
    block_hash: int
    num_bytes: int
    checksum: int


def layout_fingerprint(
    layout: KvLayout, rank: int, world_size: int, model_id: str | None = None
) -> int:
    """What the bytes of a slot mean: format, model, block shape, dtype and which rank's shard.

    The layout kind is left out on purpose: a tier slot stores a block contiguously, layer
    after layer, whatever the GPU pool's arrangement, so both kinds read the same file.
    """
    key = (
        f"kvbm-disk/{FORMAT_VERSION}/{layout.num_layers}/{layout.kv_factor}/"
        f"{layout.num_kv_heads}/{layout.tokens_per_block}/{layout.head_dim}/{layout.dtype}/"
        f"{rank}/{world_size}"
    )
    if model_id:
        key += f"/model={model_id}"
    return xxhash.xxh3_64_intdigest(key.encode())


def payload_checksum(payload: Buffer) -> int:
    # xxhash releases the GIL on large inputs, so I/O threads hash in parallel.
    return xxhash.xxh3_64_intdigest(payload)


def pack_header(header: SlotHeader, out: memoryview) -> None:
    """Write ``header`` into the first bytes of ``out`` (a zeroed ``HEADER_BYTES`` buffer)."""
    fields = _FIELDS.pack(
        _MAGIC,
        FORMAT_VERSION,
        0,
        header.fingerprint,
        header.slot,
        header.block_hash,
        header.num_bytes,
        header.checksum,
    )
    out[: _FIELDS.size] = fields
    out[_FIELDS.size : _FIELDS.size + 8] = _HEADER_CHECKSUM.pack(xxhash.xxh3_64_intdigest(fields))


def unpack_header(raw: memoryview | bytes | np.ndarray) -> SlotHeader | None:
    """The header in ``raw``, or ``None`` when it is not an intact kvbm slot header."""
    fields = bytes(raw[: _FIELDS.size])
    (stored,) = _HEADER_CHECKSUM.unpack(bytes(raw[_FIELDS.size : _FIELDS.size + 8]))
    if stored != xxhash.xxh3_64_intdigest(fields):
        return None
    magic, version, _flags, fingerprint, slot, block_hash, num_bytes, checksum = _FIELDS.unpack(
        fields
    )
    if magic != _MAGIC or version != FORMAT_VERSION:
        return None
    return SlotHeader(fingerprint, slot, block_hash, num_bytes, checksum)


def check_header(
    raw: memoryview | bytes | np.ndarray,
    *,
    fingerprint: int,
    slot: int,
    num_bytes: int,
    block_hash: int | None,
) -> SlotHeader:
    """The header of ``slot``, or ``ValueError`` saying why it does not describe the block wanted."""
    header = unpack_header(raw)
    if header is None:
        raise ValueError("slot header is missing or damaged (never written, torn or overwritten)")
    if header.fingerprint != fingerprint:
        raise ValueError("slot header belongs to another layout or rank")
    if header.slot != slot:
        raise ValueError(f"slot header names slot {header.slot} (misdirected write)")
    if header.num_bytes != num_bytes:
        raise ValueError(f"slot header says {header.num_bytes} bytes, expected {num_bytes}")
    if block_hash is not None and header.block_hash != block_hash:
        raise ValueError(
            f"slot holds block {header.block_hash:#x}, not {block_hash:#x} (stale entry)"
        )
    return header
