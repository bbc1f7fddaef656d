"""The JSON wire form of the control messages between the leader and its workers.

The messages themselves (``Completions``, ``StoredBlocks``, ``WorkerError``, ``TierSizes``,
``LoadRecovery``; ``TO_LEADER`` / ``TO_WORKERS``) are the runtime's protocol and live in
:mod:`kvbm_core.messages`, so both the runtime and this transport know them (the
``kvbm_discovery`` package re-exports them).

``encode(message) -> bytes`` and ``decode(data) -> Message``; ``decode`` validates every
field and raises :class:`MessageError` for anything that is not a kvbm message, so receivers
can ignore it with a warning. Bounds, checked before anything is used: ``MAX_MESSAGE_BYTES``
and ``MAX_DEPTH`` levels of nesting, tier names are short tokens, ``TierSizes`` at most
``MAX_TIERS`` tiers of at most ``MAX_SLOTS`` slots, and error texts are clipped to
``MAX_TEXT`` characters (also when a ``WorkerError`` is made, so none is stored whole).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from kvbm_core.messages import (
    Completions,
    LoadRecovery,
    Message,
    RestoreAck,
    StoredBlocks,
    StoredBlocksChunk,
    TierSizes,
    WorkerError,
)
from kvbm_core.transfer import JobResult, TransferJob
from kvbm_discovery.bounded_json import MAX_DEPTH, loads_bounded
from kvbm_discovery.bounded_log import MAX_TEXT, clip
from kvbm_discovery.errors import MessageError
from kvbm_discovery.restore_chunks import (
    ack_from_wire,
    ack_to_wire,
    chunk_from_wire,
    chunk_to_wire,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_DEPTH",
    "MAX_TIERS",
    "MAX_SLOTS",
    "encode",
    "decode",
]

_WIRE_VERSION = 1
_U64_MAX = 2**64 - 1
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_TIERS = 32
MAX_SLOTS = 1 << 40
_TIER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _result_to_wire(result: JobResult) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "ok": result.ok,
        "num_bytes": result.num_bytes,
        "error": None if result.error is None else clip(result.error),
        "bad_block_hashes": list(result.bad_block_hashes),
        "finished_at": result.finished_at,
    }


def encode(message: Message) -> bytes:
    if isinstance(message, Completions):
        body: dict[str, Any] = {
            "rank": message.rank,
            "results": [_result_to_wire(r) for r in message.results],
        }
    elif isinstance(message, WorkerError):
        body = {"rank": message.rank, "error": message.error}
    elif isinstance(message, StoredBlocks):
        body = {
            "rank": message.rank,
            "tier": message.tier,
            "blocks": [[h, s] for h, s in message.blocks.items()],
        }
    elif isinstance(message, StoredBlocksChunk):
        body = chunk_to_wire(message)
    elif isinstance(message, RestoreAck):
        body = ack_to_wire(message)
    elif isinstance(message, TierSizes):
        body = {"num_slots": dict(message.num_slots)}
    elif isinstance(message, LoadRecovery):
        body = {"request_id": message.request_id, "jobs": [_job_to_wire(j) for j in message.jobs]}
    else:
        raise TypeError(f"not a kvbm control message: {type(message).__name__}")
    return json.dumps({"kvbm": _WIRE_VERSION, "kind": type(message).__name__, **body}).encode()


def _job_to_wire(job: TransferJob) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "src": job.src,
        "dst": job.dst,
        "src_ids": list(job.src_ids),
        "dst_ids": list(job.dst_ids),
        "block_hashes": list(job.block_hashes),
    }


def _ids(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise MessageError(f"{name} must be a list of integers, got {value!r:.100}")
    return tuple(_int(v, f"{name}[]") for v in value)


def _job_from_wire(wire: Any) -> TransferJob:
    if not isinstance(wire, dict) or not all(isinstance(wire.get(k), str) for k in ("src", "dst")):
        raise MessageError(f"a transfer job needs src and dst media, got {wire!r:.100}")
    try:
        return TransferJob(
            _int(wire.get("job_id"), "job_id"), wire["src"], wire["dst"],
            _ids(wire.get("src_ids"), "src_ids"), _ids(wire.get("dst_ids"), "dst_ids"),
            _ids(wire.get("block_hashes", []), "block_hashes"),
        )
    except ValueError as exc:
        raise MessageError(str(exc)) from None


def _int(value: Any, name: str, minimum: int = 0, maximum: int = _U64_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise MessageError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r:.100}")
    return value


def _tier(value: Any) -> str:
    if not isinstance(value, str) or not _TIER_NAME.match(value):
        raise MessageError(f"a tier name must be 1-64 letters, digits, '_' or '-', got {value!r:.80}")
    return value


def _result_from_wire(wire: Any) -> JobResult:
    if not isinstance(wire, dict):
        raise MessageError(f"a job result must be an object, got {wire!r:.100}")
    ok = wire.get("ok")
    error = wire.get("error")
    hashes = wire.get("bad_block_hashes", [])
    finished_at = wire.get("finished_at", 0.0)
    if not isinstance(ok, bool):
        raise MessageError(f"job result 'ok' must be true/false, got {ok!r:.100}")
    if error is not None and not isinstance(error, str):
        raise MessageError(f"job result 'error' must be a string or null, got {error!r:.100}")
    if not isinstance(hashes, list):
        raise MessageError(f"'bad_block_hashes' must be a list, got {hashes!r:.100}")
    if not isinstance(finished_at, int | float) or isinstance(finished_at, bool) or not math.isfinite(finished_at):
        raise MessageError(f"'finished_at' must be a finite number, got {finished_at!r:.100}")
    return JobResult(
        job_id=_int(wire.get("job_id"), "job_id"),
        ok=ok,
        num_bytes=_int(wire.get("num_bytes", 0), "num_bytes"),
        error=None if error is None else clip(error, MAX_TEXT),
        bad_block_hashes=tuple(_int(h, "bad_block_hashes[]") for h in hashes),
        finished_at=float(finished_at),
    )


def decode(data: bytes | str) -> Message:
    """Parse one message; raises :class:`MessageError` naming what is wrong."""
    wire = loads_bounded(data, "control message", MAX_MESSAGE_BYTES, MAX_DEPTH)
    if not isinstance(wire, dict) or wire.get("kvbm") != _WIRE_VERSION:
        raise MessageError(f"not a kvbm v{_WIRE_VERSION} message (missing 'kvbm': {_WIRE_VERSION})")
    kind = wire.get("kind")
    if kind == "Completions":
        results = wire.get("results")
        if not isinstance(results, list):
            raise MessageError(f"Completions.results must be a list, got {results!r:.100}")
        return Completions(
            rank=_int(wire.get("rank"), "rank", maximum=2**31),
            results=tuple(_result_from_wire(r) for r in results),
        )
    if kind == "WorkerError":
        error = wire.get("error")
        if not isinstance(error, str):
            raise MessageError(f"WorkerError.error must be a string, got {error!r:.100}")
        return WorkerError(rank=_int(wire.get("rank"), "rank", maximum=2**31), error=error)
    if kind == "StoredBlocks":
        tier, pairs = _tier(wire.get("tier")), wire.get("blocks")
        if not isinstance(pairs, list):
            raise MessageError("StoredBlocks needs a list of [hash, slot]")
        blocks = {}
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise MessageError(f"StoredBlocks.blocks entries must be [hash, slot], got {pair!r:.100}")
            blocks[_int(pair[0], "hash")] = _int(pair[1], "slot", maximum=MAX_SLOTS)
        return StoredBlocks(_int(wire.get("rank"), "rank", maximum=2**31), tier, blocks)
    if kind in ("StoredBlocksChunk", "RestoreAck"):
        rank, tier = _int(wire.get("rank"), "rank", maximum=2**31), _tier(wire.get("tier"))
        return (chunk_from_wire if kind == "StoredBlocksChunk" else ack_from_wire)(wire, rank, tier)
    if kind == "TierSizes":
        sizes = wire.get("num_slots")
        if not isinstance(sizes, dict) or len(sizes) > MAX_TIERS:
            raise MessageError(f"TierSizes.num_slots must map at most {MAX_TIERS} tier names to counts")
        return TierSizes({_tier(k): _int(v, "num_slots[]", maximum=MAX_SLOTS) for k, v in sizes.items()})
    if kind == "LoadRecovery":
        jobs = wire.get("jobs")
        if not isinstance(jobs, list):
            raise MessageError(f"LoadRecovery.jobs must be a list, got {jobs!r:.100}")
        return LoadRecovery(_int(wire.get("request_id"), "request_id"), tuple(_job_from_wire(j) for j in jobs))
    raise MessageError(f"unknown message kind {kind!r}")
