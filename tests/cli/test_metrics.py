"""Prometheus metrics: names, types and values at scrape time; a port in use; and a scrape of a
live kvbm leader checked against the reference executor's own counts."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbm_core.config import ConfigError
from kvbm_core.metrics import COUNTERS, GAUGES, HISTOGRAMS, KvbmStats
from kvbm_trtllm.bench import BenchOptions, build_workload, run_once, size_pools
from kvbm_trtllm.metrics import LATENCY_BUCKETS, start_metrics_server


def scrape(url: str) -> dict[str, float]:
    """Sample name -> value; a histogram bucket as ``<name>_bucket:<le>``."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            le = sample.labels.get("le")
            samples[sample.name if le is None else f"{sample.name}:{float(le)}"] = sample.value
    return samples


@pytest.fixture
def server_for():
    servers = []

    def start(stats: KvbmStats, port: int = 0):
        server = start_metrics_server(stats, port, addr="127.0.0.1")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_every_name_is_exposed_with_its_value_at_scrape_time(server_for):
    stats = KvbmStats()
    server = server_for(stats)
    first = scrape(server.url)
    for name in COUNTERS:
        assert first[f"kvbm_{name}"] == 0  # Dynamo's exact names, no _total suffix
    for name in GAUGES:
        assert f"kvbm_{name}" in first
    for name in HISTOGRAMS:
        assert first[f"kvbm_{name}_count"] == 0
    stats.add("offload_blocks_d2h", 7)
    stats.add("onboard_bytes_h2d", 4096)
    stats.record_lookup(100, 60, 20)
    stats.set("host_cache_used_blocks", 12)
    second = scrape(server.url)
    assert second["kvbm_offload_blocks_d2h"] == 7
    assert second["kvbm_onboard_bytes_h2d"] == 4096
    assert second["kvbm_requests"] == 1 and second["kvbm_lookup_tokens"] == 100
    assert second["kvbm_host_cache_hit_rate"] == pytest.approx(0.6)
    assert second["kvbm_disk_cache_hit_rate"] == pytest.approx(0.2)
    assert second["kvbm_host_cache_used_blocks"] == 12


def test_latency_histograms_accumulate_across_scrapes(server_for):
    stats = KvbmStats()
    server = server_for(stats)
    stats.observe("onboard_latency_seconds", 0.0003)
    stats.observe("onboard_latency_seconds", 0.02)
    scrape(server.url)
    stats.observe("onboard_latency_seconds", 3.0)
    samples = scrape(server.url)
    assert samples["kvbm_onboard_latency_seconds_count"] == 3
    assert samples["kvbm_onboard_latency_seconds_sum"] == pytest.approx(3.0203)
    prefix = "kvbm_onboard_latency_seconds_bucket:"
    buckets = {float(k[len(prefix):]): v for k, v in samples.items() if k.startswith(prefix)}
    assert buckets[0.0005] == 1 and buckets[0.025] == 2 and buckets[5.0] == 3
    assert buckets[float("inf")] == 3 and len(buckets) == len(LATENCY_BUCKETS) + 1
    assert samples["kvbm_offload_latency_seconds_count"] == 0
    assert stats.take_latencies()["onboard_latency_seconds"] == []  # the collector drained them


def test_port_in_use_names_the_port_and_the_variable(server_for):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            server_for(KvbmStats(), port)
    message = str(info.value)
    assert str(port) in message and "KVBM_METRICS_PORT" in message


def test_close_releases_the_port(server_for):
    server = server_for(KvbmStats())
    port = server.port
    server.close()
    server.close()  # idempotent
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_scrape_of_a_live_leader_matches_the_executors_counts():
    """The kvbm leader serves /metrics during a bench run (tiny model, G2 + G3); its counters
    must agree with what the executor saw: tokens the connector matched, requests looked up,
    blocks loaded per tier."""
    options = BenchOptions(model="tiny", metrics_port=0, tiers=("cpu", "disk")).resolve()
    workload, _ = build_workload(options)
    pools = size_pools(options, workload)
    scraped: dict[str, float] = {}

    def before_shutdown(executor) -> None:
        scraped.update(scrape(executor.scheduler.metrics_server.url))

    outcome = run_once(options, workload, pools, with_kvbm=True, before_shutdown=before_shutdown)
    result = outcome.result
    t = options.tokens_per_block
    assert result.num_connector_hit_tokens > 0, "the workload must reuse something from the tiers"
    assert scraped["kvbm_matched_tokens"] == result.num_connector_hit_tokens
    assert scraped["kvbm_requests"] == len(workload.requests)
    loaded_blocks = scraped["kvbm_onboard_blocks_h2d"] + scraped["kvbm_onboard_blocks_d2d"]
    assert loaded_blocks * t == result.num_connector_hit_tokens
    assert scraped["kvbm_onboard_bytes_h2d"] > 0
    assert scraped["kvbm_offload_blocks_d2h"] > 0
    assert scraped["kvbm_failed_transfers"] == 0 and scraped["kvbm_corrupt_blocks"] == 0
    assert scraped["kvbm_host_cache_capacity_blocks"] == pools["cpu"]
    assert scraped["kvbm_disk_cache_capacity_blocks"] == pools["disk"]
    assert 0 < scraped["kvbm_host_cache_hit_rate"] + scraped["kvbm_disk_cache_hit_rate"] <= 1
    assert scraped["kvbm_onboard_latency_seconds_count"] > 0
    # The bench's own numbers come from the same stats.
    assert outcome.stats["matched_tokens"] == scraped["kvbm_matched_tokens"]


def test_half_open_connections_hold_no_threads_and_scrapes_still_work(server_for):
    stats = KvbmStats()
    stats.add("offload_blocks_d2h", 3)
    server = server_for(stats)
    threads_before = threading.active_count()
    clients = []
    try:
        for _ in range(300):  # each sends half a request and then nothing
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            clients.append(sock)
        assert threading.active_count() <= threads_before + 2  # the server's worker pool
        assert scrape(server.url)["kvbm_offload_blocks_d2h"] == 3
        assert threading.active_count() <= threads_before + 2
    finally:
        for sock in clients:
            sock.close()
    assert scrape(server.url)["kvbm_offload_blocks_d2h"] == 3


def test_the_listen_address_comes_from_kvbm_metrics_host(monkeypatch):
    monkeypatch.setenv("KVBM_METRICS_HOST", "127.0.0.1")
    server = start_metrics_server(KvbmStats(), 0)
    try:
        assert server.addr == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
        assert "kvbm_requests" in scrape(server.url)
    finally:
        server.close()


def test_an_unknown_path_is_404_and_the_server_keeps_serving(server_for):
    server = server_for(KvbmStats())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(server.url.replace("/metrics", "/nope"), timeout=5)
    assert caught.value.code == 404
    assert "kvbm_requests" in scrape(server.url)
