"""Control messages between the leader and its workers: the runtime's protocol.

The leader core (``kvbm_runtime.leader``) and every worker core (``kvbm_runtime.worker``) send
them; a discovery backend carries them (their signed, bounded JSON wire form is
:mod:`kvbm_discovery.messages`).

Workers -> leader: :class:`Completions` (a batch of ``JobResult`` from one rank; failed jobs
are results with ``ok=False``), :class:`StoredBlocks` (the blocks a persistent tier of one
rank still holds after a restart, ``{hash: slot}``; large ones travel as
:class:`StoredBlocksChunk` parts, packed arrays, each answered by a :class:`RestoreAck`; split
and wire form in :mod:`kvbm_discovery.restore_chunks`) and :class:`WorkerError` (a rank cannot go
on; its text is clipped to ``MAX_TEXT`` characters when made, so none is stored whole).
Leader -> workers: :class:`TierSizes` (what an engine's per-iteration metadata does not
carry: the slots of each tier, sent once at init) and :class:`LoadRecovery` (a request whose
load failed on that rank: load it again with ``jobs``, or, with none, report it loaded because
the engine was told to recompute what did not arrive). Both travel outside the per-iteration
metadata because a parked request may wait while the engine runs no forward pass at all.

``TO_LEADER`` / ``TO_WORKERS``: the kinds each side may receive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from kvbm_core.bounded_text import clip
from kvbm_core.transfer import JobResult, TransferJob

__all__ = [
    "Completions",
    "StoredBlocks",
    "WorkerError",
    "TierSizes",
    "LoadRecovery",
    "StoredBlocksChunk",
    "RestoreAck",
    "Message",
    "TO_LEADER",
    "TO_WORKERS",
]


@dataclass(frozen=True)
class Completions:
    rank: int
    results: tuple[JobResult, ...]


@dataclass(frozen=True)
class WorkerError:
    rank: int
    error: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", clip(self.error))


@dataclass(frozen=True)
class TierSizes:
    num_slots: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredBlocks:
    rank: int
    tier: str
    blocks: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadRecovery:
    request_id: int
    jobs: tuple[TransferJob, ...] = ()


@dataclass(frozen=True)
class StoredBlocksChunk:
    """Part ``chunk_index`` of ``num_chunks`` of one rank's restored blocks of one tier."""

    rank: int
    tier: str
    restore_id: str  # a fresh token per worker start, so parts of two starts never mix
    chunk_index: int
    num_chunks: int
    hashes: bytes = b""  # packed little-endian uint64
    slots: bytes = b""  # packed little-endian int32, one per hash

    @property
    def num_blocks(self) -> int:
        return len(self.hashes) // 8

    def hash_array(self) -> np.ndarray:
        return np.frombuffer(self.hashes, dtype="<u8")

    def slot_array(self) -> np.ndarray:
        return np.frombuffer(self.slots, dtype="<i4")


@dataclass(frozen=True)
class RestoreAck:
    """The leader holds part ``chunk_index`` of ``restore_id``: the sender's window moves on."""

    rank: int
    tier: str
    restore_id: str
    chunk_index: int


Message = Completions | WorkerError | TierSizes | StoredBlocks | LoadRecovery | StoredBlocksChunk | RestoreAck
TO_LEADER = (Completions, WorkerError, StoredBlocks, StoredBlocksChunk)
TO_WORKERS = (TierSizes, LoadRecovery, RestoreAck)
