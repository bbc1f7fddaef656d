"""Host storage: the slot view, background pinning, its deadline and its errors.

No GPU here, so pinning is exercised through a subclass whose ``_pin_range`` (the one call
that reaches cudaHostRegister) waits on a gate or fails on demand; everything around it (the
thread pool, progress, deadline, deferring jobs, unpinning) is the real code.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time

import numpy as np
import pytest

from kvbm_tiers_cpu import GpuToHostHandler, HostMemoryError, PinnedHostStorage


class GatedPinStorage(PinnedHostStorage):
    """Stands in for cudaHostRegister (no GPU here): each range waits for ``gate``."""

    def __init__(self, *args, fail_on: int | None = None, **kwargs):
        self.gate = threading.Event()
        self.fail_on = fail_on
        self.pinned: list[int] = []
        self.unpinned: list[int] = []
        self.num_active = 0
        self.num_attempts = 0
        self.max_active = 0
        self._count_lock = threading.Lock()
        super().__init__(*args, pin=True, huge_pages=False, **kwargs)

    def _pin_range(self, ptr: int, size: int) -> None:
        with self._count_lock:
            self.num_active += 1
            self.max_active = max(self.max_active, self.num_active)
            index = self.num_attempts
            self.num_attempts += 1
        try:
            assert self._gate_for(ptr).wait(10), "test never opened the gate"
            if self.fail_on is not None and index == self.fail_on:
                raise OSError(12, "Cannot allocate memory")
            self.pinned.append(ptr)
        finally:
            with self._count_lock:
                self.num_active -= 1

    def _gate_for(self, ptr: int) -> threading.Event:
        return self.gate

    def _unpin_range(self, ptr: int) -> None:
        self.unpinned.append(ptr)


def test_host_view_is_the_slot_array_and_shares_memory(kv):
    layout = kv.make_layout(kv.FC)
    host = PinnedHostStorage(layout, 10, pin=False)
    view = host.host_view()
    assert view.shape == (10, layout.bytes_per_block) and view.dtype == np.uint8
    assert host.is_ready and host.failure is None
    view[3] = 7
    assert int(host.rows[3].sum()) == 7 * layout.bytes_per_block
    host.close()
    host.close()
    assert host.host_view() is None and not host.is_ready


@pytest.mark.parametrize("huge_pages", [False, True])
def test_pinned_ranges_cover_every_slot_and_start_on_a_page(kv, huge_pages):
    layout = kv.make_layout(kv.FC, num_layers=3, heads=1, tokens=1, head_dim=100)  # 1200-byte blocks
    host = PinnedHostStorage(layout, 5000, pin=False, pin_chunk_bytes=100_000, huge_pages=huge_pages)
    page = (2 << 20) if huge_pages else mmap.PAGESIZE
    starts = [start for start, _ in host.pin_ranges]
    assert starts[0] == 0 and host.pin_ranges[-1][1] == 5000
    assert all(end == next_start for (_, end), next_start in zip(host.pin_ranges, starts[1:], strict=False))
    assert all(start * layout.bytes_per_block % page == 0 for start in starts)
    assert len(host.pin_ranges) == (1 if huge_pages else 20)


def test_zero_slots_is_an_error_naming_the_setting(kv):
    with pytest.raises(ValueError, match="KVBM_CPU_CACHE_GB"):
        PinnedHostStorage(kv.make_layout(kv.FC), 0, pin=False)


def test_pinning_runs_the_first_range_alone_then_in_parallel_and_logs_progress(kv, caplog):
    caplog.set_level(logging.INFO, logger="kvbm.tiers.cpu")
    layout = kv.make_layout(kv.FC)
    host = RangeGatedStorage(layout, 64, num_ranges=8, pin_threads=4)
    assert len(host.pin_ranges) == 8 and not host.is_ready and host.failure is None
    assert _wait(lambda: host.num_active == 1)
    time.sleep(0.05)
    assert host.max_active == 1, "the first range pins alone: it is the first to serve"
    host.gates[0].set()
    assert _wait(lambda: host.num_active == 4)
    assert host.max_active == 4 and host.num_ready_slots == 8
    for gate in host.gates:
        gate.set()
    host.wait_ready(10)
    assert host.is_ready and host.pinned_bytes == host.num_bytes
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "pinning 0.0 GiB of host memory in 8 range(s), 4 thread(s)" in messages
    assert "pinned in" in messages
    host.close()
    assert sorted(host.unpinned) == sorted(host.pinned) and len(host.pinned) == 8


def test_wait_ready_timeout_says_what_it_waited_for(kv):
    layout = kv.make_layout(kv.FC)
    host = GatedPinStorage(layout, 16, pin_threads=1, pin_chunk_bytes=4 * layout.bytes_per_block, init_timeout_s=600)
    with pytest.raises(HostMemoryError) as caught:
        host.wait_ready(0.05)
    message = str(caught.value)
    assert "pinned host memory was still not ready after" in message
    assert "of 0.0 GiB pinned" in message
    assert "KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS (now 600 s)" in message
    assert host.failure is None  # the init deadline has not passed: it may still come
    host.gate.set()
    host.close()


def test_jobs_wait_for_pinning_then_run(kv, rng):
    layout = kv.make_layout(kv.FC)
    pool = kv.make_pool(layout, 8)
    host = GatedPinStorage(layout, 16, pin_threads=2, pin_chunk_bytes=4 * layout.bytes_per_block)
    offload = GpuToHostHandler(pool, host)
    job = kv.job("gpu", "cpu", [1, 2], [5, 9])
    offload.submit([job])
    assert offload.poll() == [] and offload.num_pending == 1
    assert not host.host_view()[[5, 9]].any()
    host.gate.set()
    host.wait_ready(10)
    results = kv.run(offload, [], submitted=[job])
    assert results[job.job_id].ok
    np.testing.assert_array_equal(host.host_view()[[5, 9]], kv.block_bytes(pool, [1, 2]))
    host.close()


def test_jobs_fail_once_the_init_deadline_passes(kv):
    layout = kv.make_layout(kv.FC)
    pool = kv.make_pool(layout, 8)
    host = GatedPinStorage(layout, 16, init_timeout_s=0.05)
    offload = GpuToHostHandler(pool, host)
    early = kv.job("gpu", "cpu", [1], [1])
    offload.submit([early])
    time.sleep(0.1)
    late = kv.job("gpu", "cpu", [2], [2])
    results = kv.run(offload, [[late]], submitted=[early])
    for job in (early, late):
        assert not results[job.job_id].ok
        assert "KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS (now 0.05 s)" in results[job.job_id].error
    assert "still not ready" in host.failure
    host.gate.set()
    host.close()


def test_a_pinning_failure_is_reported_and_what_was_pinned_is_released(kv):
    layout = kv.make_layout(kv.FC)
    host = GatedPinStorage(layout, 16, fail_on=1, pin_threads=1, pin_chunk_bytes=4 * layout.bytes_per_block)
    host.gate.set()
    with pytest.raises(HostMemoryError, match=r"could not pin .* \(OSError: \[Errno 12\] Cannot allocate memory\); lower KVBM_CPU_CACHE_GB"):
        host.wait_ready(10)
    assert not host.is_ready and "could not pin" in host.failure
    host.close()
    assert host.pinned and sorted(host.unpinned) == sorted(host.pinned)
    assert len(host.pinned) < len(host.pin_ranges)


class RangeGatedStorage(GatedPinStorage):
    """Each range waits for its own gate, so a test decides which ranges are pinned."""

    def __init__(self, layout, num_slots, num_ranges, pin_threads=None, **kwargs):
        self.gates = [threading.Event() for _ in range(num_ranges)]
        self._bpb = layout.bytes_per_block
        super().__init__(layout, num_slots, pin_threads=pin_threads or num_ranges,
                         pin_chunk_bytes=num_slots // num_ranges * layout.bytes_per_block, **kwargs)  # fmt: skip

    def _gate_for(self, ptr: int) -> threading.Event:
        return self.gates[(ptr - self.rows.data_ptr()) // (self.slots_per_range * self._bpb)]


def _poll_until(handler, job_id, timeout=5.0):
    results = {}
    assert _wait(lambda: results.update({r.job_id: r for r in handler.poll()}) or job_id in results, timeout)
    return results


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.001)
    return predicate()


def test_pinned_ranges_serve_while_the_rest_is_still_pinning(kv):
    layout = kv.make_layout(kv.FC)
    pool = kv.make_pool(layout, 8)
    host = RangeGatedStorage(layout, 16, num_ranges=4)  # 4 slots per range
    assert host.first_ready_s is None and host.num_ready_slots == 0
    host.gates[0].set()
    assert _wait(lambda: host.num_ready_slots == 4)
    assert host.first_ready_s is not None and not host.is_ready
    assert host.are_slots_ready(np.array([0, 3])) and not host.are_slots_ready(np.array([3, 4]))
    offload = GpuToHostHandler(pool, host)
    early, late = kv.job("gpu", "cpu", [1, 2], [0, 3]), kv.job("gpu", "cpu", [3], [13])
    offload.submit([early, late])
    results = _poll_until(offload, early.job_id)
    assert results[early.job_id].ok, "a job in a pinned range does not wait for the others"
    np.testing.assert_array_equal(host.host_view()[[0, 3]], kv.block_bytes(pool, [1, 2]))
    assert offload.num_pending == 1 and not host.host_view()[13].any(), "range 3 is not pinned yet"
    host.gates[3].set()  # only the range it needs: 1 and 2 still pin
    results = kv.run(offload, [], submitted=[late])
    assert results[late.job_id].ok and not host.is_ready
    np.testing.assert_array_equal(host.host_view()[[13]], kv.block_bytes(pool, [3]))
    for gate in host.gates:
        gate.set()
    host.wait_ready(10)
    host.close()


def test_the_init_timeout_bounds_a_stall_not_the_whole_pinning(kv):
    """Six ranges of 0.1 s each, one at a time, take 0.6 s: twice the 0.3 s timeout, yet fine."""

    class SlowPin(PinnedHostStorage):
        def _pin_range(self, ptr: int, size: int) -> None:
            time.sleep(0.1)

        def _unpin_range(self, ptr: int) -> None:
            pass

    layout = kv.make_layout(kv.FC)
    host = SlowPin(layout, 12, pin=True, huge_pages=False, pin_threads=1,
                   pin_chunk_bytes=2 * layout.bytes_per_block, init_timeout_s=0.3)  # fmt: skip
    host.wait_ready()
    assert host.is_ready and host.failure is None and host.num_ready_slots == 12
    assert host.first_ready_s is not None and host.first_ready_s < 0.3
    host.close()
