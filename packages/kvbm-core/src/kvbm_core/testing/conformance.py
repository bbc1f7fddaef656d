"""``TierConformance``: the pytest checks every kvbm tier plugin must pass.

Subclass it in a test module, name the tier, and pytest runs every check::

    from kvbm_core.testing import TierConformance

    class TestMyTier(TierConformance):
        tier_name = "my-tier"

Class attributes tune the rig (``base_layout``, ``num_slots``, ``num_gpu_blocks``,
``num_jobs``, ``blocked_plugins``, ``extra_tiers``, ``tier_options``); fixtures
(``kvbm_config``, ``device``, ``layout``) can be overridden like any pytest fixture. Every
check runs for both GPU layouts (fully contiguous and layer-separate). A tier whose handlers
need another tier's storage lists that tier in ``TierSpec.requires``; the kit builds it too.

What is checked, for every ``(src, dst)`` pair the tier's handlers declare:
- round trip: random bytes land intact in non-adjacent slots, with ``num_jobs`` jobs submitted
  in several batches before the first poll; each job is reported exactly once, ``num_pending``
  reaches 0, and slots no job named keep their bytes. On a host-addressable storage a block's
  bytes are the GPU block's layers in order (layer-major), whatever the GPU layout;
- failures: jobs naming a tier slot past the end, a negative tier slot or a slot of the other
  medium past the end fail as results (``ok`` False, an ``error``), while the other jobs of
  the same batch succeed;
- capacity: ``storage.num_slots`` equals ``TierContext.num_slots`` and the storage's layout
  has the context's ``bytes_per_block``;
- slot reuse: 2.5x the capacity stored with slots from the leader's ``TierIndex`` (which evicts
  and hands slots out again); every block still indexed reads back as its last store;
- lifecycle: an idle handler polls nothing; ``close()`` of handlers (even with jobs in flight)
  and storages can be called twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import pytest

from kvbm_core.config import KvbmConfig
from kvbm_core.layout import KvLayout, LayoutKind
from kvbm_core.plugins import TierSpec, get_plugin_manager, load_tier_specs
from kvbm_core.testing.rig import (
    SlotPicker,
    TierRig,
    build_tier_rig,
    default_device,
    is_host_addressable,
    make_job,
    read_blocks,
    record_hashes,
    route,
    run_jobs,
    split,
    write_blocks,
)
from kvbm_core.transfer import GPU, TransferEngine, TransferHandler, TransferJob

__all__ = ["TierConformance"]


class TierConformance:
    """Base class of a tier plugin's conformance tests (see the module docstring)."""

    tier_name: ClassVar[str] = ""
    # 4 layers x K,V x (2 heads x 4 tokens x 64) bf16 = 8 KiB blocks: O_DIRECT-friendly sizes.
    base_layout: ClassVar[KvLayout] = KvLayout(
        num_layers=4, tokens_per_block=4, num_kv_heads=2, head_dim=64, dtype="bfloat16"
    )
    num_slots: ClassVar[int] = 256
    num_gpu_blocks: ClassVar[int] = 232
    num_jobs: ClassVar[int] = 64
    blocked_plugins: ClassVar[tuple[str, ...]] = ()
    extra_tiers: ClassVar[tuple[str, ...]] = ()
    tier_options: ClassVar[Mapping[str, Any]] = {}
    timeout_s: ClassVar[float] = 60.0

    # --- fixtures ------------------------------------------------------------------------

    @pytest.fixture(params=list(LayoutKind), ids=[k.value for k in LayoutKind])
    def layout(self, request: pytest.FixtureRequest) -> KvLayout:
        return replace(self.base_layout, kind=request.param)

    @pytest.fixture
    def kvbm_config(self, tmp_path: Any) -> KvbmConfig:
        return KvbmConfig(
            cpu_cache_override_num_blocks=self.num_slots,
            disk_cache_override_num_blocks=self.num_slots,
            disk_cache_dir=str(tmp_path / "kvbm-disk"),
        )

    @pytest.fixture
    def device(self) -> str:
        return default_device()

    @pytest.fixture
    def tier_spec(self) -> TierSpec:
        assert self.tier_name, f"{type(self).__name__} must set tier_name"
        return load_tier_specs(get_plugin_manager(self.blocked_plugins), required=[self.tier_name])[
            self.tier_name
        ]

    @pytest.fixture
    def rig(self, layout: KvLayout, kvbm_config: KvbmConfig, device: str) -> Iterator[TierRig]:
        rig = build_tier_rig(
            self.tier_name,
            layout,
            num_slots=self.num_slots,
            num_gpu_blocks=self.num_gpu_blocks,
            config=kvbm_config,
            device=device,
            blocked_plugins=self.blocked_plugins,
            extra_tiers=self.extra_tiers,
            options=self.tier_options,
        )
        yield rig
        rig.close()

    # --- the plugin and its spec ---------------------------------------------------------

    def test_found_through_an_entry_point(self, tier_spec: TierSpec) -> None:
        pm = get_plugin_manager(self.blocked_plugins)
        providers = [
            impl.plugin_name
            for impl in pm.hook.kvbm_tier_specs.get_hookimpls()
            if any(s.name == self.tier_name for s in impl.function() or [])  # type: ignore[attr-defined]
        ]
        from_entry_points = {str(pm.get_name(plugin)) for plugin, _ in pm.list_plugin_distinfo()}
        assert providers and set(providers) <= from_entry_points, (
            f"tier {self.tier_name!r} comes from plugin(s) {providers}, not from an installed "
            f"entry point of group 'kvbm' (entry-point plugins: {sorted(from_entry_points)})"
        )

    def test_spec_is_well_formed(self, tier_spec: TierSpec) -> None:
        assert tier_spec.name == self.tier_name
        assert isinstance(tier_spec.medium, str) and tier_spec.medium, (
            "medium must be a non-empty str"
        )
        assert tier_spec.medium != GPU, "a tier below the GPU cannot use the medium name 'gpu'"
        assert isinstance(tier_spec.level, int) and tier_spec.level >= 2, (
            f"level must be an int >= 2 (2 host memory, 3 local disk, 4+ shared), got {tier_spec.level!r}"
        )
        assert callable(tier_spec.make_storage) and callable(tier_spec.make_handlers)
        assert all(isinstance(name, str) for name in tier_spec.requires)

    # --- capacity ------------------------------------------------------------------------

    def test_storage_capacity(self, rig: TierRig, layout: KvLayout) -> None:
        storage, ctx = rig.storage, rig.contexts[rig.medium]
        assert storage.medium == rig.medium, (
            f"storage.medium {storage.medium!r} != spec medium {rig.medium!r}"
        )
        assert storage.num_slots == ctx.num_slots == self.num_slots
        assert storage.layout.bytes_per_block == layout.bytes_per_block
        view = storage.host_view()
        if view is not None:
            assert view.dtype == np.uint8, f"host_view() dtype is {view.dtype}, expected uint8"
            assert view.shape == (ctx.num_slots, layout.bytes_per_block), (
                f"host_view() shape {view.shape} != (num_slots, bytes_per_block) "
                f"{(ctx.num_slots, layout.bytes_per_block)}"
            )

    # --- handlers ------------------------------------------------------------------------

    def test_handlers_are_declared_once(self, rig: TierRig) -> None:
        assert rig.handlers, f"tier {self.tier_name!r} returned no transfer handlers"
        for handler in rig.handlers:
            assert isinstance(handler, TransferHandler), f"{handler!r} is not a TransferHandler"
            assert rig.medium in (handler.src_medium, handler.dst_medium), (
                f"handler {handler.src_medium} -> {handler.dst_medium} does not touch medium {rig.medium!r}"
            )
            assert handler.num_pending == 0 and handler.poll() == [], (
                "an idle handler must poll nothing"
            )
        engine = TransferEngine(
            [*rig.handlers, *rig.required_handlers]
        )  # raises on a duplicate pair
        assert set(rig.pairs) <= engine.pairs

    def test_round_trip(self, rig: TierRig) -> None:
        failures = []
        for seed, (src, dst) in enumerate(rig.pairs):
            try:
                self._check_pair(rig, src, dst, seed)
            except AssertionError as exc:
                failures.append(f"{src} -> {dst}: {exc}")
        assert not failures, "\n".join(failures)

    def test_failed_jobs_are_results(self, rig: TierRig) -> None:
        failures = []
        for seed, (src, dst) in enumerate(rig.pairs):
            try:
                self._check_failures(rig, src, dst, 1000 + seed)
            except AssertionError as exc:
                failures.append(f"{src} -> {dst}: {exc}")
        assert not failures, "\n".join(failures)

    def test_evicted_slots_hold_their_new_blocks(self, rig: TierRig) -> None:
        """Stores driven by the leader's ``TierIndex`` (2.5x capacity, so slots are reused)."""
        index_module = pytest.importorskip(
            "kvbm_core.index", reason="kvbm_core.index not available"
        )
        index = index_module.TierIndex(rig.medium, rig.storage.num_slots)
        source, store = route(rig, rig.medium, outward=False)
        rng = np.random.default_rng(11)
        held: dict[int, np.ndarray] = {}
        batch = 32
        for round_ in range(int(2.5 * rig.storage.num_slots) // batch):
            hashes = [(round_ << 32) | i for i in range(batch)]
            allocation = index.prepare_store(hashes)
            assert allocation is not None and len(allocation.slots) == batch
            for evicted in allocation.evicted_hashes:
                held.pop(evicted)
            picker = SlotPicker(rig, seed=round_)
            data = rng.integers(0, 256, size=(batch, rig.layout.bytes_per_block), dtype=np.uint8)
            source_ids = picker.take(source, batch)
            write_blocks(rig, source, source_ids, data, hashes, picker)
            jobs = [
                make_job(rig, source, rig.medium, [s], [d])
                for s, d in zip(source_ids, allocation.slots, strict=True)
            ]
            results = run_jobs(rig, store, [jobs], self.timeout_s)
            assert all(r.ok for r in results.values()), "a store into a reused slot failed"
            record_hashes(rig, jobs, results)
            index.complete_store(hashes, success=True)
            held.update(zip(hashes, data, strict=True))
        readable = index.readable_hashes()
        assert sorted(readable) == sorted(held)
        for start in range(0, len(readable), batch):
            chunk = readable[start : start + batch]
            slots = [index.slot_of(h) for h in chunk]
            landed = read_blocks(rig, rig.medium, slots, SlotPicker(rig, seed=start))
            stale = [
                h for h, got in zip(chunk, landed, strict=True) if not np.array_equal(got, held[h])
            ]
            assert not stale, f"{len(stale)} reused slots serve other bytes than their last store"

    def test_close_is_idempotent(self, rig: TierRig) -> None:
        picker = SlotPicker(rig, seed=7)
        for handler in rig.handlers:
            src, dst = handler.src_medium, handler.dst_medium
            count = min(16, rig.storages[src].num_slots, rig.storages[dst].num_slots)
            jobs = [
                make_job(rig, src, dst, [s], [d])
                for s, d in zip(picker.take(src, count), picker.take(dst, count), strict=True)
            ]
            handler.submit(jobs, rig.ready_fence(src))
            handler.close()  # with jobs in flight
            handler.close()
        for storage in rig.storages.values():
            storage.close()
            storage.close()

    # --- the checks ----------------------------------------------------------------------

    def _job_sizes(self, index: int) -> int:
        return 1 + index % 2

    def _check_pair(self, rig: TierRig, src: str, dst: str, seed: int) -> None:
        handler = rig.handler(src, dst)
        assert handler is not None
        picker = SlotPicker(rig, seed)
        num_blocks = sum(self._job_sizes(i) for i in range(self.num_jobs))
        src_ids, dst_ids = picker.take(src, num_blocks), picker.take(dst, num_blocks)
        data = picker.random_bytes(num_blocks, rig.layout.bytes_per_block)
        write_blocks(rig, src, src_ids, data, picker.random_hashes(num_blocks), picker)
        before = (
            read_blocks(rig, dst, range(rig.storages[dst].num_slots), picker)
            if is_host_addressable(rig.storages[dst])
            else None
        )

        jobs = [
            make_job(rig, src, dst, s, d)
            for s, d in zip(
                split(src_ids, self._job_sizes), split(dst_ids, self._job_sizes), strict=True
            )
        ]
        # Several submits before the first poll: handlers must queue, not assume one batch.
        cuts = [0, 1, 8, len(jobs) // 2, len(jobs)]
        batches = [jobs[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        results = run_jobs(rig, handler, batches, self.timeout_s)
        failed = [r for r in results.values() if not r.ok]
        assert not failed, f"{len(failed)} of {len(jobs)} jobs failed, first: {failed[0].error}"
        for job in jobs:
            expected = job.num_blocks * rig.layout.bytes_per_block
            got = results[job.job_id].num_bytes
            assert got in (0, expected), (
                f"job {job.job_id} reports {got} bytes for {expected} moved"
            )
        record_hashes(rig, jobs, results)

        landed = read_blocks(rig, dst, dst_ids, picker)
        wrong = [i for i in range(num_blocks) if not np.array_equal(landed[i], data[i])]
        assert not wrong, (
            f"{len(wrong)} of {num_blocks} blocks arrived with wrong bytes "
            f"(first: src slot {src_ids[wrong[0]]} -> dst slot {dst_ids[wrong[0]]})"
        )
        if before is not None:
            after = read_blocks(rig, dst, range(rig.storages[dst].num_slots), picker)
            untouched = sorted(set(range(len(after))) - set(dst_ids))
            changed = [i for i in untouched if not np.array_equal(after[i], before[i])]
            assert not changed, f"slots no job named were overwritten: {changed[:8]}"

    def _check_failures(self, rig: TierRig, src: str, dst: str, seed: int) -> None:
        handler = rig.handler(src, dst)
        assert handler is not None
        picker = SlotPicker(rig, seed)
        num_good = 8
        src_ids, dst_ids = picker.take(src, num_good + 3), picker.take(dst, num_good + 3)
        data = picker.random_bytes(num_good + 3, rig.layout.bytes_per_block)
        write_blocks(rig, src, src_ids, data, picker.random_hashes(num_good + 3), picker)
        good = [make_job(rig, src, dst, [s], [d]) for s, d in zip(src_ids, dst_ids, strict=True)][
            :num_good
        ]
        tier_is_src = src == rig.medium
        past_end = rig.storages[rig.medium].num_slots
        other = dst if tier_is_src else src
        bad_slot = [(past_end + 3, "a tier slot past the end"), (-1, "a negative tier slot")]
        bad: list[tuple[TransferJob, str]] = []
        for (slot, why), s, d in zip(
            bad_slot, src_ids[num_good:], dst_ids[num_good:], strict=False
        ):
            s, d = (slot, d) if tier_is_src else (s, slot)
            bad.append((make_job(rig, src, dst, [s], [d]), why))
        huge = rig.storages[other].num_slots + 1000
        s, d = (src_ids[-1], huge) if tier_is_src else (huge, dst_ids[-1])
        bad.append((make_job(rig, src, dst, [s], [d]), f"a {other} slot past the end"))
        mixed = good[:3] + [bad[0][0]] + good[3:5] + [bad[1][0]] + good[5:] + [bad[2][0]]
        results = run_jobs(rig, handler, [mixed], self.timeout_s)
        for job, why in bad:
            result = results[job.job_id]
            assert not result.ok, f"a job naming {why} ({job.src_ids} -> {job.dst_ids}) succeeded"
            assert isinstance(result.error, str) and result.error, (
                f"the failed job naming {why} has no error text"
            )
        failed = [results[j.job_id] for j in good if not results[j.job_id].ok]
        assert not failed, f"good jobs failed next to bad ones: {failed[0].error}"
        record_hashes(rig, good, results)
        landed = read_blocks(rig, dst, dst_ids[:num_good], picker)
        assert np.array_equal(landed, data[:num_good]), (
            "good jobs next to failed ones moved wrong bytes"
        )
