"""What the block manager hands out: tiers it plans for, matches, per-iteration plans, and the
outcome of failed loads. Plain picklable dataclasses (plans cross process boundaries); built by
the leader's :class:`~kvbm_core.manager.BlockManager`, executed by every worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvbm_core.transfer import GPU, TransferJob

if TYPE_CHECKING:
    from kvbm_core.admission import AdmissionPolicy
    from kvbm_core.presence import PresenceSource

__all__ = ["TierSlots", "Match", "IterationPlan", "LoadOutcome"]


@dataclass(frozen=True, slots=True)
class TierSlots:
    """A tier the manager plans for, as its :class:`~kvbm_core.plugins.TierSpec` describes it.

    ``name`` is the tier's key everywhere (index, jobs' ``src``/``dst``, the worker's storage).
    ``stores_from`` names the tiers (or ``"gpu"``) whose blocks its handlers copy in;
    ``admission`` picks the blocks it takes from the tier above (``None``: the manager's
    default for tiers below the top one). ``presence`` marks a tier shared with other engines:
    its index caches what the store holds (see :mod:`kvbm_core.presence`).
    """

    name: str
    num_slots: int
    stores_from: tuple[str, ...] = (GPU,)
    admission: AdmissionPolicy | None = None
    presence: PresenceSource | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """What ``BlockManager.lookup`` found for one request: what kvbm's tiers will load.

    Args:
        num_tokens: prompt tokens past the engine's own cache hit that kvbm loads (whole blocks;
            0: nothing to load, the engine computes them). The connector returns it to the engine.
        num_blocks_by_tier: of those blocks, how many each tier serves, by tier name (``"cpu"``,
            ``"disk"``, a plugin's tier); tiers serving none are left out.
    """

    num_tokens: int = 0
    num_blocks_by_tier: Mapping[str, int] = field(default_factory=dict)

    # Dynamo's host/disk names for the built-in tiers (its metrics are named that way).
    @property
    def num_host_blocks(self) -> int:
        """Returns: the blocks the built-in host-memory tier (``cpu``, G2) serves."""
        return self.num_blocks_by_tier.get("cpu", 0)

    @property
    def num_disk_blocks(self) -> int:
        """Returns: the blocks the built-in disk tier (``disk``, G3) serves."""
        return self.num_blocks_by_tier.get("disk", 0)


@dataclass(frozen=True, slots=True)
class IterationPlan:
    """What every worker does this iteration.

    ``jobs`` whose source is the GPU wait for the forward pass; the others start at once.
    ``load_job_ids`` maps a request to the jobs that must finish before its KV is loaded;
    ``gpu_job_ids`` to every job reading or writing its GPU blocks. Loads of requests in
    ``sync_request_ids`` must land before this iteration's forward pass reads them.
    """

    iteration: int
    jobs: tuple[TransferJob, ...] = ()
    load_job_ids: dict[int, tuple[int, ...]] = field(default_factory=dict)
    gpu_job_ids: dict[int, tuple[int, ...]] = field(default_factory=dict)
    sync_request_ids: tuple[int, ...] = ()
    failed_load_request_ids: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.jobs and not self.failed_load_request_ids


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    """A request whose loads failed: either ``retry_jobs`` for the ``retry_ranks`` that failed
    (send them; the request's loads are pending again), or, with no retry left,
    ``recompute_from_token``: the first prompt position whose KV did not arrive."""

    request_id: int
    retry_jobs: tuple[TransferJob, ...] = ()
    retry_ranks: tuple[int, ...] = ()
    recompute_from_token: int | None = None
