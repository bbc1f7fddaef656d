"""The conformance kit fails tiers that break the transfer contract.

Each test takes the example mmap tier (a real, conforming tier), breaks one thing in a subclass
of its handler, and runs one of the kit's checks on it, which must raise ``AssertionError``.
The buggy tiers are handed to ``build_tier_rig`` as specs, not installed as entry points.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest

from kvbm_core import GPU, JobResult, KvbmConfig, KvLayout, LayoutKind, TierSpec, TransferJob
from kvbm_core.testing import TierConformance, TierRig, build_tier_rig

pytest.importorskip("torch")
handlers = pytest.importorskip("kvbm_tier_example.handlers")
plugin = pytest.importorskip("kvbm_tier_example.plugin")

KIT = TierConformance()
LAYOUT = replace(TierConformance.base_layout, kind=LayoutKind.LAYER_SEPARATE)


class OffByOne(handlers.MmapHandler):
    """Stores every block one slot further than asked (wrapping at the end)."""

    def _move(self, gpu_ids: Sequence[int], slot_ids: Sequence[int], ready: Any) -> None:
        if self._is_store:
            slot_ids = [(s + 1) % self._mapped.num_slots for s in slot_ids]
        super()._move(gpu_ids, slot_ids, ready)


class ReportsTwice(handlers.MmapHandler):
    def poll(self) -> list[JobResult]:
        results = super().poll()
        return results + results[:1]


class RaisesOnBadSlot(handlers.MmapHandler):
    def submit(self, jobs: Sequence[TransferJob], ready: Any = None) -> None:
        for job in jobs:
            if any(i >= self._mapped.num_slots for i in (*job.src_ids, *job.dst_ids)):
                raise IndexError("slot out of range")
        super().submit(jobs, ready)


class WrapsNegativeSlots(handlers.MmapHandler):
    """Lets numpy read slot -1 as the last slot, as a handler without bounds checks would."""

    def _run(self, job: TransferJob, ready: Any) -> JobResult:
        slot_ids = job.dst_ids if self._is_store else job.src_ids
        if any(i < 0 for i in slot_ids):
            gpu_ids = job.src_ids if self._is_store else job.dst_ids
            self._move(gpu_ids, slot_ids, ready)
            return JobResult(job.job_id, True)
        return super()._run(job, ready)


class LayersReversed(handlers.MmapHandler):
    """Stores a layer-separate block's layers last-first (loads mirror it, so round trips pass)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pieces = self._pieces[::-1]


class WriteOnce(handlers.MmapHandler):
    """Skips stores into slots it wrote before, yet reports them done (a stale-slot bug)."""

    written: set[int]

    def _move(self, gpu_ids: Sequence[int], slot_ids: Sequence[int], ready: Any) -> None:
        self.written = getattr(self, "written", set())
        fresh = [(g, s) for g, s in zip(gpu_ids, slot_ids, strict=True) if s not in self.written]
        self.written.update(slot_ids)
        if fresh:
            super()._move([g for g, _ in fresh], [s for _, s in fresh], ready)


class NeverFinishes(handlers.MmapHandler):
    def poll(self) -> list[JobResult]:
        return []


def _spec_with(handler_class: type) -> dict[str, TierSpec]:
    def make_handlers(storages: Any, ctx: Any) -> list[Any]:
        pool, mapped = storages[GPU], storages[plugin.MEDIUM]
        return [
            handler_class(pool, mapped, store=True),
            handlers.MmapHandler(pool, mapped, store=False),
        ]

    spec = TierSpec(plugin.TIER_NAME, plugin.MEDIUM, 4, plugin.make_storage, make_handlers)
    return {spec.name: spec}


@pytest.fixture
def make_rig(tmp_path: Any) -> Iterator[Any]:
    rigs: list[TierRig] = []

    def make(handler_class: type, layout: KvLayout = LAYOUT) -> TierRig:
        rig = build_tier_rig(
            plugin.TIER_NAME,
            layout,
            num_slots=KIT.num_slots,
            num_gpu_blocks=KIT.num_gpu_blocks,
            config=KvbmConfig(),
            device="cpu",
            specs=_spec_with(handler_class),
        )
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def test_a_conforming_handler_passes(make_rig: Any) -> None:
    rig = make_rig(handlers.MmapHandler)
    KIT._check_pair(rig, GPU, plugin.MEDIUM, seed=0)
    KIT._check_failures(rig, GPU, plugin.MEDIUM, seed=1)


def test_wrong_slot_is_caught(make_rig: Any) -> None:
    with pytest.raises(AssertionError, match="wrong bytes|overwritten"):
        KIT._check_pair(make_rig(OffByOne), GPU, plugin.MEDIUM, seed=0)


def test_job_reported_twice_is_caught(make_rig: Any) -> None:
    with pytest.raises(AssertionError, match="twice"):
        KIT._check_pair(make_rig(ReportsTwice), GPU, plugin.MEDIUM, seed=0)


def test_raising_on_a_bad_slot_is_caught(make_rig: Any) -> None:
    with pytest.raises(IndexError):
        KIT._check_failures(make_rig(RaisesOnBadSlot), GPU, plugin.MEDIUM, seed=0)


def test_negative_slot_served_as_the_last_is_caught(make_rig: Any) -> None:
    with pytest.raises(AssertionError, match="negative tier slot"):
        KIT._check_failures(make_rig(WrapsNegativeSlots), GPU, plugin.MEDIUM, seed=0)


def test_non_canonical_block_bytes_are_caught(make_rig: Any) -> None:
    with pytest.raises(AssertionError, match="wrong bytes"):
        KIT._check_pair(make_rig(LayersReversed), GPU, plugin.MEDIUM, seed=0)


def test_job_never_reported_is_caught(make_rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(NeverFinishes)
    monkeypatch.setattr(KIT, "timeout_s", 0.2)
    with pytest.raises(AssertionError, match="never reported"):
        KIT._check_pair(rig, GPU, plugin.MEDIUM, seed=0)


def test_missing_required_storage_names_requires(tmp_path: Any) -> None:
    def make_handlers(storages: Any, ctx: Any) -> list[Any]:
        return [handlers.MmapHandler(storages["cpu"], storages[plugin.MEDIUM], store=True)]

    spec = TierSpec(plugin.TIER_NAME, plugin.MEDIUM, 4, plugin.make_storage, make_handlers)
    with pytest.raises(KeyError, match="TierSpec.requires"):
        build_tier_rig(
            spec.name,
            LAYOUT,
            num_slots=8,
            num_gpu_blocks=8,
            config=KvbmConfig(),
            device="cpu",
            specs={spec.name: spec},
        )


def test_stale_bytes_in_a_reused_slot_are_caught(make_rig: Any) -> None:
    rig = make_rig(WriteOnce)
    KIT._check_pair(rig, GPU, plugin.MEDIUM, seed=0)  # first writes: every slot is fresh
    with pytest.raises(AssertionError, match="reused slots serve other bytes"):
        KIT.test_evicted_slots_hold_their_new_blocks(rig)
