"""Prometheus metrics of a kvbm leader, served over HTTP (``/metrics``).

Which process: the leader (rank 0, the scheduler process) starts it when ``KVBM_METRICS`` is
on. Its counts already cover every TP rank, since every rank's completions reach the leader.

Operations:
- ``start_metrics_server(stats, port, addr=None) -> MetricsServer``: serve ``stats`` on
  ``addr:port`` (0 picks a free port: ``server.port``; ``addr`` None: ``KVBM_METRICS_HOST``,
  default every interface). A port in use raises :class:`ConfigError` naming the port and
  ``KVBM_METRICS_PORT``. ``server.close()`` stops it (idempotent). The server uses a fixed
  number of threads whatever the clients do (see :mod:`kvbm_trtllm.metrics_http`).
- ``KvbmCollector(stats)``: a prometheus-client collector reading ``stats`` at scrape time:
  every name of ``kvbm_core.metrics`` as ``kvbm_<name>``; counters keep Dynamo's exact names
  (``kvbm_offload_blocks_d2h``, no ``_total`` suffix, so Dynamo's dashboards keep working)
  and are therefore exposed untyped; gauges as gauges; the latency lists as histograms.
  Failures have their own counters: ``kvbm_failed_transfers``, ``kvbm_timed_out_jobs`` (jobs
  some rank never reported within ``KVBM_JOB_TIMEOUT_SECS``), ``kvbm_failed_loads``.
- ``LatencyHistogram``: cumulative buckets fed from ``stats.take_latencies()``; the collector
  owns one per histogram name, so it is the only consumer of ``take_latencies`` while it runs.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.metrics import COUNTERS, GAUGES, HISTOGRAMS, PREFIX, KvbmStats
from kvbm_trtllm.metrics_http import BoundedHttpServer

__all__ = [
    "LATENCY_BUCKETS",
    "LatencyHistogram",
    "KvbmCollector",
    "MetricsServer",
    "start_metrics_server",
]

# Seconds: a 64 KiB block over PCIe takes microseconds; a cold disk read of a long prefix, seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)


@dataclass
class LatencyHistogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total_s: float = 0.0
    num_observed: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def add(self, samples: Iterable[float]) -> None:
        for seconds in samples:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.total_s += seconds
            self.num_observed += 1

    def cumulative(self) -> list[tuple[str, int]]:
        rows, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            rows.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return rows


class KvbmCollector(Collector):
    def __init__(self, stats: KvbmStats, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.stats = stats
        self.histograms = {name: LatencyHistogram(tuple(buckets)) for name in HISTOGRAMS}
        self._lock = threading.Lock()

    def update_histograms(self) -> dict[str, LatencyHistogram]:
        """Move the latencies observed since the last call into the cumulative histograms."""
        with self._lock:
            for name, samples in self.stats.take_latencies().items():
                self.histograms[name].add(samples)
            return self.histograms

    def collect(self) -> Iterator[Metric]:
        snapshot = self.stats.snapshot()
        for name, help_text in COUNTERS.items():
            metric = Metric(PREFIX + name, help_text, "unknown")
            metric.add_sample(PREFIX + name, {}, float(snapshot.get(name, 0)))
            yield metric
        for name, help_text in GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, help_text, value=float(snapshot.get(name, 0.0)))
        for name, hist in self.update_histograms().items():
            with self._lock:
                buckets, total = hist.cumulative(), hist.total_s
            yield HistogramMetricFamily(PREFIX + name, HISTOGRAMS[name], buckets=buckets, sum_value=total)


class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it."""

    def __init__(self, collector: KvbmCollector, server: BoundedHttpServer, addr: str):
        self.collector = collector
        self.port: int = server.port
        self.addr = addr
        self._server = server

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(self.addr, self.addr)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.close()


def start_metrics_server(stats: KvbmStats, port: int, addr: str | None = None) -> MetricsServer:
    if addr is None:
        addr = KvbmConfig.from_env().metrics_host
    registry = CollectorRegistry(auto_describe=False)
    collector = KvbmCollector(stats)
    registry.register(collector)
    try:
        server = BoundedHttpServer(
            addr, port, lambda: (generate_latest(registry), CONTENT_TYPE_LATEST)
        )
    except OSError as exc:
        raise ConfigError(
            f"kvbm metrics: cannot listen on {addr}:{port} ({exc.strerror or exc}); another "
            f"process holds the port, or KVBM_METRICS_HOST is not an address of this machine. "
            f"Set KVBM_METRICS_PORT (or DYN_KVBM_METRICS_PORT) to a free port, or "
            f"KVBM_METRICS=0 to turn the endpoint off"
        ) from None
    return MetricsServer(collector, server, addr)
