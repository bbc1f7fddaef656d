"""Metric names and the in-process counters behind them.

The leader owns one ``KvbmStats``; the planner and the connector update it, and the Prometheus
exporter (kvbm-trtllm) reads it. Names follow Dynamo's KVBM (prefix ``kvbm_``) plus bytes,
latencies, failures and per-tier occupancy. Hit rates are over a sliding window of the last
``HIT_RATE_WINDOW`` requests, as Dynamo computes them.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

__all__ = ["PREFIX", "COUNTERS", "GAUGES", "HISTOGRAMS", "KvbmStats", "HIT_RATE_WINDOW"]

PREFIX = "kvbm_"
HIT_RATE_WINDOW = 1000

# name -> help; suffixes follow Dynamo: d2h = GPU->host, h2d = host->disk (offload) or
# host->GPU (onboard), d2d = GPU->disk (offload) or disk->GPU (onboard).
COUNTERS: dict[str, str] = {
    "offload_blocks_d2h": "Blocks offloaded from GPU to host memory (G1->G2)",
    "offload_blocks_h2d": "Blocks offloaded from host memory to disk (G2->G3)",
    "offload_blocks_d2d": "Blocks offloaded from GPU straight to disk (G1->G3)",
    "onboard_blocks_h2d": "Blocks onboarded from host memory to GPU (G2->G1)",
    "onboard_blocks_d2d": "Blocks onboarded from disk to GPU (G3->G1)",
    "offload_bytes_d2h": "Bytes offloaded G1->G2 (all ranks)",
    "offload_bytes_h2d": "Bytes offloaded G2->G3 (all ranks)",
    "offload_bytes_d2d": "Bytes offloaded G1->G3 (all ranks)",
    "onboard_bytes_h2d": "Bytes onboarded G2->G1 (all ranks)",
    "onboard_bytes_d2d": "Bytes onboarded G3->G1 (all ranks)",
    "matched_tokens": "Prompt tokens served from kvbm tiers instead of being computed",
    "lookup_tokens": "Prompt tokens looked up in kvbm tiers (beyond the GPU's own hit)",
    "requests": "Requests looked up",
    "failed_transfers": "Transfer jobs that failed",
    "timed_out_jobs": "Transfer jobs failed because some rank did not report them within KVBM_JOB_TIMEOUT_SECS",
    "corrupt_blocks": "Blocks dropped because their bytes failed an integrity check",
    "shared_presence_queries": "Existence queries the leader sent to shared (G4) tiers",
    "shared_presence_hits": "Blocks other engines stored that the leader found in a shared tier",
    "failed_loads": "Load jobs into GPU blocks that failed on some rank",
    "retried_loads": "Failed loads retried from another copy of the same blocks",
    "recomputed_load_tokens": "Prompt tokens the engine recomputed because their KV did not load",
    "evicted_blocks_host": "Blocks evicted from host memory",
    "evicted_blocks_disk": "Blocks evicted from disk",
    "store_skipped_full": "Blocks not stored because the tier was full of pinned blocks",
    "events_dropped": "KV events dropped by a sink that could not keep up",
    "control_rejected_messages": "Control messages refused: unsigned, badly signed, replayed from "
    "another sender, malformed, oversized or failing validation",
    "restore_failures": "Restores of a persistent tier after a restart that failed: parts missing "
    "past the restore timeout, or more blocks claimed than the tier has slots",
    "control_dropped_messages": "Control messages refused because the leader's inbox was full "
    "(NATS senders retry them)",
}
GAUGES: dict[str, str] = {
    "host_cache_hit_rate": "Share of looked-up tokens found in host memory (last 1000 requests)",
    "disk_cache_hit_rate": "Share of looked-up tokens found on disk (last 1000 requests)",
    "host_cache_used_blocks": "Host-memory blocks holding KV",
    "host_cache_capacity_blocks": "Host-memory capacity in blocks",
    "disk_cache_used_blocks": "Disk blocks holding KV",
    "disk_cache_capacity_blocks": "Disk capacity in blocks",
    "host_cache_retired_blocks": "Host-memory slots retired after repeated write failures",
    "disk_cache_retired_blocks": "Disk slots retired after repeated write failures",
}
HISTOGRAMS: dict[str, str] = {
    "onboard_latency_seconds": "Time from planning a load to its completion on all ranks",
    "offload_latency_seconds": "Time from planning a store to its completion on all ranks",
}


@dataclass
class KvbmStats:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    gauges: dict[str, float] = field(default_factory=lambda: dict.fromkeys(GAUGES, 0.0))
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in HISTOGRAMS})
    _window: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=HIT_RATE_WINDOW))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self.latencies[name].append(seconds)

    def take_latencies(self) -> dict[str, list[float]]:
        with self._lock:
            taken, self.latencies = self.latencies, {k: [] for k in HISTOGRAMS}
        return taken

    def record_lookup(self, num_lookup_tokens: int, num_host_tokens: int, num_disk_tokens: int) -> None:
        """One request's lookup: tokens asked for, and how many each tier will serve."""
        with self._lock:
            self.counters["requests"] += 1
            self.counters["lookup_tokens"] += num_lookup_tokens
            self._window.append((num_lookup_tokens, num_host_tokens, num_disk_tokens))
            total = sum(w[0] for w in self._window)
            host = sum(w[1] for w in self._window)
            disk = sum(w[2] for w in self._window)
        self.gauges["host_cache_hit_rate"] = host / total if total else 0.0
        self.gauges["disk_cache_hit_rate"] = disk / total if total else 0.0

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {**self.counters, **self.gauges}
