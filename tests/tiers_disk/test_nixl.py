"""The NIXL backend of the host <-> disk handlers (``disk_backend=nixl``) and how it is chosen.

Real NIXL (the nixl-cu13 wheel's POSIX backend, Linux AIO, no GPU needed) against a real file;
faults are real too: the tier's file descriptor is swapped for one opened read-only or
write-only (``dup2``), so the kernel fails NIXL's I/O. Tests that need NIXL are skipped where
no NIXL wheel is importable; the selection tests that hide NIXL run everywhere.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.plugins import TierContext
from kvbm_core.testing import TierConformance
from kvbm_core.transfer import TransferEngine, TransferJob
from kvbm_tiers_disk import plugin
from kvbm_tiers_disk.handlers import DiskToHostHandler, HostToDiskHandler
from kvbm_tiers_disk.nixl_handlers import NixlDiskToHostHandler, NixlHostToDiskHandler
from kvbm_tiers_disk.nixl_io import NIXL_MODULES, load_nixl
from kvbm_tiers_disk.storage import DiskStorage

needs_nixl = pytest.mark.skipif(
    load_nixl() is None, reason="no NIXL wheel (nixl / nixl-cu13 / nixl-cu12) is importable"
)
_ids = itertools.count(1)


def _job(src, dst, src_ids, dst_ids, hashes=None):
    if hashes is None:
        disk_ids = dst_ids if dst == "disk" else src_ids
        hashes = tuple(20_000 + d for d in disk_ids)
    return TransferJob(next(_ids), src, dst, tuple(src_ids), tuple(dst_ids), tuple(hashes))


def _run(handler, jobs, ready=None):
    handler.submit(jobs, ready)
    results = handler.wait(timeout=60)
    assert handler.num_pending == 0
    assert sorted(r.job_id for r in results) == sorted(j.job_id for j in jobs)  # each once
    assert handler.poll() == []
    return {r.job_id: r for r in results}


@contextmanager
def _fd_swapped(storage: DiskStorage, flags: int) -> Iterator[None]:
    """Make the tier's descriptor number name the file opened with ``flags`` for a while."""
    saved = os.dup(storage.fd)
    other = os.open(storage.path, flags)
    os.dup2(other, storage.fd)
    os.close(other)
    try:
        yield
    finally:
        os.dup2(saved, storage.fd)
        os.close(saved)


@pytest.fixture
def nixl_pair(host, storage):
    # 3 staging slots: jobs of 12 blocks queue and go out in several requests.
    up = NixlHostToDiskHandler(host.host_view(), storage, num_staging_slots=3)
    down = NixlDiskToHostHandler(host.host_view(), storage, num_staging_slots=3)
    yield up, down
    up.close()
    down.close()


@needs_nixl
def test_round_trip_many_blocks_and_jobs_in_flight(host, nixl_pair, storage):
    up, down = nixl_pair
    original = host.rows.copy()
    slots = [15, 0, 7, 3, 9, 1, 12, 5, 2, 11, 8, 4]
    jobs = [_job("cpu", "disk", [r], [slots[r]]) for r in range(6)]
    jobs.append(_job("cpu", "disk", range(6, 12), slots[6:]))
    results = _run(up, jobs)
    assert all(
        r.ok and r.num_bytes == storage.layout.bytes_per_block * len(j.src_ids)
        for j, r in zip(jobs, results.values(), strict=True)
    )
    assert storage.stored_blocks() == {20_000 + s: s for s in slots}
    host.rows[:] = 0
    back = [_job("disk", "cpu", [slots[r]], [11 - r]) for r in range(12)]
    assert all(r.ok for r in _run(down, back).values())
    assert np.array_equal(host.rows[::-1], original)
    assert storage.stats["blocks_read"] == 12 and storage.stats["blocks_written"] == 12


@needs_nixl
def test_nixl_and_thread_handlers_share_the_slot_format(host, nixl_pair, storage):
    up, _ = nixl_pair
    original = host.rows.copy()
    _run(up, [_job("cpu", "disk", range(4), range(4))])
    host.rows[:] = 0
    threads_down = DiskToHostHandler(host.host_view(), storage, num_threads=2)
    try:
        assert all(
            r.ok for r in _run(threads_down, [_job("disk", "cpu", range(4), range(4))]).values()
        )
    finally:
        threads_down.close()
    assert np.array_equal(host.rows[:4], original[:4])


@needs_nixl
def test_corrupt_block_is_caught_in_staging_and_never_reaches_the_row(host, nixl_pair, storage):
    up, down = nixl_pair
    _run(up, [_job("cpu", "disk", range(4), range(4))])
    with open(storage.path, "r+b") as f:
        f.seek(storage.geometry.offset(2) + 4096 + 10)
        f.write(b"\xff\xfe")
    host.rows[6:10] = 7
    good = _job("disk", "cpu", [0, 1], [6, 7])
    bad = _job("disk", "cpu", [2, 3], [8, 9])
    results = _run(down, [good, bad])
    assert results[good.job_id].ok
    assert not results[bad.job_id].ok
    assert results[bad.job_id].bad_block_hashes == (20_002,)
    assert "1 of 2 blocks failed" in results[bad.job_id].error
    assert (host.rows[8] == 7).all()  # the corrupt block's row is untouched
    assert storage.stats["corrupt_blocks"] == 1
    assert 20_002 not in storage.stored_blocks()


@needs_nixl
def test_stale_hash_is_caught(nixl_pair):
    up, down = nixl_pair
    _run(up, [_job("cpu", "disk", [0], [4])])
    (result,) = _run(down, [_job("disk", "cpu", [4], [1], hashes=[123])]).values()
    assert not result.ok and result.bad_block_hashes == (123,)


@needs_nixl
def test_failed_nixl_write_fails_the_jobs_and_the_tier_recovers(host, nixl_pair, storage):
    up, _ = nixl_pair
    with _fd_swapped(storage, os.O_RDONLY):
        results = _run(up, [_job("cpu", "disk", range(5), range(5)), _job("cpu", "disk", [5], [5])])
    assert not any(r.ok for r in results.values())
    assert all("NIXL" in r.error for r in results.values())
    assert storage.stats["write_failures"] == 6 and storage.stats["io_errors"] == 6
    assert storage.stored_blocks() == {}
    assert all(r.ok for r in _run(up, [_job("cpu", "disk", range(5), range(5))]).values())
    assert len(storage.stored_blocks()) == 5


@needs_nixl
def test_failed_nixl_read_names_the_blocks(host, nixl_pair, storage):
    up, down = nixl_pair
    _run(up, [_job("cpu", "disk", range(4), range(4))])
    host.rows[:4] = 9
    with _fd_swapped(storage, os.O_WRONLY):
        (result,) = _run(down, [_job("disk", "cpu", range(4), range(4))]).values()
    assert not result.ok and "NIXL" in result.error
    assert sorted(result.bad_block_hashes) == [20_000, 20_001, 20_002, 20_003]
    assert (host.rows[:4] == 9).all()
    assert storage.stats["read_failures"] == 4


@needs_nixl
def test_submit_returns_before_the_ready_fence_fires(host, nixl_pair, storage):
    up, _ = nixl_pair
    fence = threading.Event()
    up.submit([_job("cpu", "disk", [0, 1], [0, 1])], fence)
    assert up.poll() == [] and up.num_pending == 1
    assert storage.stats["blocks_written"] == 0
    fence.set()
    (result,) = up.wait(timeout=60)
    assert result.ok and storage.stats["blocks_written"] == 2


@needs_nixl
def test_bad_jobs_and_close_fail_as_results(host, nixl_pair, storage):
    up, down = nixl_pair
    out_of_range = _job("cpu", "disk", [0], [99])
    twice = _job("disk", "cpu", [0, 1], [3, 3])
    assert not _run(up, [out_of_range])[out_of_range.job_id].ok
    assert not _run(down, [twice])[twice.job_id].ok
    waiting = _job("cpu", "disk", [0, 1], [0, 1])
    up.submit([waiting], threading.Event())  # a fence that never fires
    up.close()
    (result,) = up.poll()
    assert not result.ok and "closed" in result.error
    late = _job("cpu", "disk", [0], [0])
    up.submit([late])
    (result,) = up.poll()
    assert not result.ok and "closed" in result.error


@needs_nixl
def test_handlers_work_inside_a_transfer_engine(host, storage):
    engine = TransferEngine(
        [
            NixlHostToDiskHandler(host.host_view(), storage),
            NixlDiskToHostHandler(host.host_view(), storage),
        ]
    )
    original = host.rows.copy()
    try:
        engine.submit([_job("cpu", "disk", range(12), range(12))])
        assert all(r.ok for r in engine.wait(timeout=60))
        host.rows[:] = 0
        engine.submit([_job("disk", "cpu", range(12), range(12))])
        assert all(r.ok for r in engine.wait(timeout=60))
    finally:
        engine.close()
    assert np.array_equal(host.rows, original)


# ---------------------------------------------------------------------- selection


@pytest.fixture
def ctx(layout, cache_dir):
    config = KvbmConfig(cpu_cache_gb=1, disk_cache_gb=1, disk_cache_dir=str(cache_dir))
    return TierContext(layout, 8, config=config, options={"disk_io_threads": 2})


def _with(ctx, **options):
    return TierContext(
        ctx.layout, ctx.num_slots, config=ctx.config, options={**ctx.options, **options}
    )


def _handler_types(ctx, make_host):
    disk = plugin.make_storage(ctx)
    try:
        handlers = plugin.make_handlers({"disk": disk, "cpu": make_host(ctx.layout, 4)}, ctx)
        types = [type(h) for h in handlers]
        for handler in handlers:
            handler.close()
    finally:
        disk.close()
    return types


@pytest.fixture
def no_nixl(monkeypatch):
    """Hide every NIXL wheel: a ``None`` entry in ``sys.modules`` makes its import fail."""
    for name in NIXL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, f"{name}._api", None)
    assert load_nixl() is None


@needs_nixl
@pytest.mark.parametrize("options", [{}, {"disk_backend": "auto"}, {"disk_backend": "NIXL"}])
def test_nixl_is_used_when_importable(ctx, make_host, options, monkeypatch):
    monkeypatch.delenv("KVBM_DISK_BACKEND", raising=False)
    types = _handler_types(_with(ctx, **options), make_host)
    assert types == [NixlHostToDiskHandler, NixlDiskToHostHandler]


def test_threads_when_asked(ctx, make_host, monkeypatch):
    assert _handler_types(_with(ctx, disk_backend="threads"), make_host) == [
        HostToDiskHandler,
        DiskToHostHandler,
    ]
    monkeypatch.setenv("KVBM_DISK_BACKEND", "threads")
    assert _handler_types(ctx, make_host) == [HostToDiskHandler, DiskToHostHandler]


def test_tier_option_wins_over_the_environment(ctx, monkeypatch):
    monkeypatch.setenv("KVBM_DISK_BACKEND", "nixl")
    assert plugin.disk_backend(_with(ctx, disk_backend="threads")) == "threads"


def test_auto_falls_back_to_threads_without_nixl(ctx, make_host, no_nixl, monkeypatch):
    monkeypatch.delenv("KVBM_DISK_BACKEND", raising=False)
    assert _handler_types(ctx, make_host) == [HostToDiskHandler, DiskToHostHandler]


def test_nixl_asked_for_but_missing_names_the_fix(ctx, no_nixl, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"disk_backend=nixl.*pip install 'kvbm-tiers-disk\[nixl\]'"
    ):
        plugin.make_storage(_with(ctx, disk_backend="nixl"))
    monkeypatch.setenv("KVBM_DISK_BACKEND", "nixl")
    with pytest.raises(ConfigError, match="disk_backend=threads"):
        plugin.make_storage(ctx)


def test_unknown_backend_is_a_config_error(ctx, monkeypatch):
    with pytest.raises(ConfigError, match=r"disk_backend.*'gds'.*auto, nixl, threads"):
        plugin.make_storage(_with(ctx, disk_backend="gds"))
    monkeypatch.setenv("KVBM_DISK_BACKEND", "fast")
    with pytest.raises(ConfigError, match="KVBM_DISK_BACKEND='fast'"):
        plugin.make_storage(ctx)


# ---------------------------------------------------------------------- conformance


@needs_nixl
@pytest.mark.skipif(
    importlib.util.find_spec("kvbm_tiers_cpu") is None,
    reason="the disk tier's handlers need the cpu tier (kvbm-tiers-cpu) installed",
)
class TestDiskTierOnNixl(TierConformance):
    tier_name = "disk"
    blocked_plugins = ("example",)
    tier_options = {"disk_io_threads": 4, "disk_backend": "nixl"}
