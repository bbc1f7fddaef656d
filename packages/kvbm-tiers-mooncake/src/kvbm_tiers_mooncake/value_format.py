"""What one stored value holds: a 64-byte header, then one rank's shard of one block (workers).

Header (little-endian)::

    magic        8s   b"KVBMMC01"
    version      u32  FORMAT_VERSION
    reserved     u32  0
    block_hash   u64  the block the value holds
    key_digest   u64  xxh3_64 of the store key it was put under
    layout       u64  layout fingerprint: block shape, dtype, rank and world size, model
    length       u64  payload bytes
    checksum     u64  xxh3_64 of the payload
    header_sum   u64  xxh3_64 of the 56 bytes before it

``check_value`` accepts a value only when every field matches what the reader expects; a
value copied under another key, torn, truncated, of another layout or with one flipped byte
is refused before a byte of it reaches the GPU.
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

from kvbm_core.layout import KvLayout

__all__ = [
    "HEADER_BYTES",
    "FORMAT_VERSION",
    "CorruptValueError",
    "layout_fingerprint",
    "pack_header",
    "check_value",
]

HEADER_BYTES = 64
FORMAT_VERSION = 1
_MAGIC = b"KVBMMC01"
_FIELDS = struct.Struct("<8sIIQQQQQ")
_SUM = struct.Struct("<Q")


class CorruptValueError(Exception):
    """A stored value that is not the block asked for (corrupt, stale or foreign)."""


def layout_fingerprint(layout: KvLayout, rank: int, world_size: int, model_id: str | None) -> int:
    # The layout kind is left out: a value holds the block layer after layer whatever the
    # GPU pool's arrangement, so engines with either kind share values.
    key = (
        f"kvbm-mooncake/{FORMAT_VERSION}/{layout.num_layers}/{layout.kv_factor}/"
        f"{layout.num_kv_heads}/{layout.tokens_per_block}/{layout.head_dim}/{layout.dtype}/"
        f"{rank}/{world_size}/model={model_id or ''}"
    )
    return xxhash.xxh3_64_intdigest(key.encode())


def key_digest(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())


def pack_header(
    out: np.ndarray, block_hash: int, key: str, layout_fp: int, payload: np.ndarray
) -> None:
    """Write the header of ``payload`` into ``out`` (``HEADER_BYTES`` uint8)."""
    fields = _FIELDS.pack(
        _MAGIC,
        FORMAT_VERSION,
        0,
        block_hash & 0xFFFFFFFFFFFFFFFF,
        key_digest(key),
        layout_fp,
        payload.nbytes,
        xxhash.xxh3_64_intdigest(payload.data),
    )
    out[: _FIELDS.size] = np.frombuffer(fields, dtype=np.uint8)
    out[_FIELDS.size : HEADER_BYTES] = np.frombuffer(
        _SUM.pack(xxhash.xxh3_64_intdigest(fields)), dtype=np.uint8
    )


def check_value(value: np.ndarray, block_hash: int, key: str, layout_fp: int) -> None:
    """Raise ``CorruptValueError`` naming the first mismatch unless ``value`` is that block's value."""
    if value.nbytes < HEADER_BYTES:
        raise CorruptValueError(f"{key}: {value.nbytes} bytes, shorter than the header")
    header = value[:HEADER_BYTES].tobytes()
    fields = header[: _FIELDS.size]
    if _SUM.unpack(header[_FIELDS.size :])[0] != xxhash.xxh3_64_intdigest(fields):
        raise CorruptValueError(f"{key}: header checksum mismatch")
    magic, version, _, got_hash, got_key, got_layout, length, checksum = _FIELDS.unpack(fields)
    expected = (_MAGIC, FORMAT_VERSION, block_hash & 0xFFFFFFFFFFFFFFFF, key_digest(key), layout_fp)
    if (magic, version, got_hash, got_key, got_layout) != expected:
        raise CorruptValueError(f"{key}: header names another block, key, layout or format")
    payload = value[HEADER_BYTES:]
    if length != payload.nbytes:
        raise CorruptValueError(f"{key}: payload of {payload.nbytes} bytes, header says {length}")
    if xxhash.xxh3_64_intdigest(payload.data) != checksum:
        raise CorruptValueError(f"{key}: payload checksum mismatch")
