"""KvbmStats: Dynamo's metric names, counters, latencies and windowed hit rates."""

from __future__ import annotations

import threading

import pytest

from kvbm_core.metrics import COUNTERS, GAUGES, HISTOGRAMS, HIT_RATE_WINDOW, PREFIX, KvbmStats

DYNAMO_NAMES = {
    "offload_blocks_d2h",
    "offload_blocks_h2d",
    "onboard_blocks_h2d",
    "onboard_blocks_d2d",
    "matched_tokens",
    "host_cache_hit_rate",
    "disk_cache_hit_rate",
}


def test_dynamos_metrics_are_all_there() -> None:
    assert PREFIX == "kvbm_"
    assert set(COUNTERS) | set(GAUGES) >= DYNAMO_NAMES
    assert not set(COUNTERS) & set(GAUGES)
    assert all(
        help_text for help_text in [*COUNTERS.values(), *GAUGES.values(), *HISTOGRAMS.values()]
    )


def test_counters_start_at_zero_and_add() -> None:
    stats = KvbmStats()
    assert set(stats.counters.values()) == {0}
    stats.add("offload_blocks_d2h")
    stats.add("offload_blocks_d2h", 4)
    assert stats.counters["offload_blocks_d2h"] == 5


def test_an_unknown_counter_is_refused() -> None:
    with pytest.raises(KeyError):
        KvbmStats().add("offload_blocks_typo")


def test_latencies_are_taken_once() -> None:
    stats = KvbmStats()
    stats.observe("onboard_latency_seconds", 0.25)
    stats.observe("onboard_latency_seconds", 0.5)
    assert stats.take_latencies()["onboard_latency_seconds"] == [0.25, 0.5]
    assert stats.take_latencies() == {name: [] for name in HISTOGRAMS}


def test_hit_rates_are_shares_of_looked_up_tokens() -> None:
    stats = KvbmStats()
    stats.record_lookup(100, 50, 25)
    stats.record_lookup(100, 0, 0)
    snapshot = stats.snapshot()
    assert snapshot["host_cache_hit_rate"] == pytest.approx(0.25)
    assert snapshot["disk_cache_hit_rate"] == pytest.approx(0.125)
    assert snapshot["requests"] == 2 and snapshot["lookup_tokens"] == 200


def test_no_tokens_looked_up_is_a_zero_rate() -> None:
    stats = KvbmStats()
    stats.record_lookup(0, 0, 0)
    assert stats.gauges["host_cache_hit_rate"] == 0.0


def test_hit_rate_covers_only_the_last_window_of_requests() -> None:
    stats = KvbmStats()
    stats.record_lookup(10, 10, 0)
    for _ in range(HIT_RATE_WINDOW - 1):
        stats.record_lookup(10, 0, 0)
    assert stats.gauges["host_cache_hit_rate"] == pytest.approx(1 / HIT_RATE_WINDOW)
    stats.record_lookup(10, 0, 0)  # pushes the one hit out
    assert stats.gauges["host_cache_hit_rate"] == 0.0
    assert stats.counters["requests"] == HIT_RATE_WINDOW + 1


def test_gauges_are_set_and_snapshotted() -> None:
    stats = KvbmStats()
    stats.set("host_cache_used_blocks", 12)
    assert stats.snapshot()["host_cache_used_blocks"] == 12
    assert set(stats.snapshot()) == set(COUNTERS) | set(GAUGES)


def test_counting_from_many_threads_loses_nothing() -> None:
    stats = KvbmStats()

    def count() -> None:
        for _ in range(2000):
            stats.add("matched_tokens", 3)
            stats.observe("offload_latency_seconds", 0.001)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stats.counters["matched_tokens"] == 4 * 2000 * 3
    assert len(stats.take_latencies()["offload_latency_seconds"]) == 4 * 2000
