"""Control messages between the leader and its workers: the runtime's protocol.

The leader core (``kvbm_runtime.leader``) and every worker core (``kvbm_runtime.worker``) send
them; a discovery backend carries them (their signed, bounded JSON wire form is
:mod:`kvbm_discovery.messages`).

Workers -> leader: :class:`Completions` (a batch of ``JobResult`` from one rank; failed jobs
are results with ``ok=False``), :class:`StoredBlocks` (the blocks a persistent tier of one
rank still holds after a restart, ``{hash: slot}``) and :class:`WorkerError` (a rank cannot go
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

from kvbm_core.bounded_text import clip
from kvbm_core.transfer import JobResult, TransferJob

__all__ = [
    "Completions",
    "StoredBlocks",
    "WorkerError",
    "TierSizes",
    "LoadRecovery",
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


Message = Completions | WorkerError | TierSizes | StoredBlocks | LoadRecovery
TO_LEADER = (Completions, WorkerError, StoredBlocks)
TO_WORKERS = (TierSizes, LoadRecovery)
