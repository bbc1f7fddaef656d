"""The block manager's private bookkeeping: one record per request and per planned job."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbm_core.index import TierIndex
from kvbm_core.transfer import TransferJob


@dataclass(slots=True)
class _Request:
    request_id: int
    salt: int
    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    num_skip_blocks: int = 0
    num_planned_blocks: int = 0
    load_sources: list[tuple[TierIndex, int]] = field(default_factory=list)
    first_load_block: int = 0
    pending_job_ids: set[int] = field(default_factory=set)
    is_finished: bool = False
    is_sync_load: bool = False
    num_pending_loads: int = 0
    load_failed_at_block: int | None = None
    num_load_retries: int = 0


@dataclass(slots=True)
class _JobRecord:
    job: TransferJob
    request_id: int | None
    src_index: TierIndex | None
    src_slots: tuple[int, ...]
    dst_index: TierIndex | None
    token_blocks: tuple[tuple[int, ...], ...]
    parent_hash: int | None
    remaining_ranks: set[int]
    planned_at: float
    num_bytes: int = 0
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    bad_hashes: set[int] = field(default_factory=set)
    failed_ranks: set[int] = field(default_factory=set)
    first_block: int = 0
    deadline: float | None = None  # set once the job is sent: all ranks must report by then
    is_timed_out: bool = False
