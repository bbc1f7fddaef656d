"""One ``kvbm bench`` run through the reference executor, with kvbm or without it.

Which process: the ``kvbm`` command (or a test); TP>1 runs one spawned process per rank
(:mod:`kvbm_trtllm.bench_tp`). Operations:
- ``run_once(options, workload, pools, with_kvbm, ...) -> RunOutcome``: one executor run, with
  ``KvbmConnectorLeader/Worker`` (G2 in memory, G3 in a temporary directory unless
  ``--disk-dir``, in-process discovery) or with the ``NullConnector`` baseline; the kvbm run
  also returns the leader's stats and, at TP=1, the probed transfer rates.
- ``kvbm_settings(options, pools, disk_dir, namespace)``: the run's ``llm_args.extra["kvbm"]``,
  checked by ``KvbmConfig`` (``BenchError`` naming the bad value).
- ``warm_up(options)``: one short request, so one-time start-up costs land in neither run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_discovery.local_servers import free_port
from kvbm_trtllm.bench_options import BenchError, ResolvedBenchOptions
from kvbm_trtllm.bench_outcome import RunOutcome, leader_stats
from kvbm_trtllm.bench_probe import probe_transfers
from kvbm_trtllm.bench_tp import run_tp_bench

__all__ = ["run_once", "kvbm_settings", "warm_up"]


def kvbm_settings(options: ResolvedBenchOptions, pools: dict[str, int], disk_dir: str, namespace: str) -> dict[str, Any]:
    """The ``llm_args.extra["kvbm"]`` mapping of a bench run (wins over KVBM_* variables)."""
    settings: dict[str, Any] = {
        "discovery": "inproc",
        "namespace": namespace,
        "disk_cache_dir": disk_dir,
        "metrics": options.metrics_port is not None,
        "events": False,
        "nats_url": "",
        "disable_disk_offload_filter": not options.disk_offload_filter,
        "leader_worker_init_timeout_secs": 120,
    }
    if options.metrics_port is not None:
        settings["metrics_port"] = options.metrics_port or free_port()
    if options.cpu_cache_gb is not None and "cpu" in options.tiers:
        settings["cpu_cache_gb"] = options.cpu_cache_gb
    else:
        settings["cpu_cache_override_num_blocks"] = pools["cpu"]
    if options.disk_cache_gb is not None and "disk" in options.tiers:
        settings["disk_cache_gb"] = options.disk_cache_gb
    else:
        settings["disk_cache_override_num_blocks"] = pools["disk"]
    try:
        KvbmConfig.from_env(overrides=settings)
    except ConfigError as exc:
        raise BenchError(f"kvbm config: {exc}") from None
    return settings


_RUN_IDS = itertools.count()


def run_once(
    options: ResolvedBenchOptions,
    workload: Any,
    pools: dict[str, int],
    with_kvbm: bool,
    *,
    on_request_finished: Callable[[], None] | None = None,
    before_shutdown: Callable[[Any], None] | None = None,
) -> RunOutcome:
    """One executor run. ``before_shutdown(executor)`` sees the connector still running."""
    from kvbm_trtllm.executor import Executor, ModelConfig, PoolConfig
    from kvbm_trtllm.trtllm_api import KvCacheConfigLike, LlmArgsLike

    model_config = ModelConfig(device=options.device, name=f"bench-{options.model}", seed=options.seed,
                               **options.model_preset)
    pool_config = PoolConfig(num_blocks=pools["gpu"], tokens_per_block=options.tokens_per_block)
    temp_dir = None
    settings = None
    if with_kvbm:
        disk_dir = options.disk_dir
        if disk_dir is None:
            temp_dir = disk_dir = tempfile.mkdtemp(prefix="kvbm-bench-")
        namespace = f"bench-{os.getpid()}-{next(_RUN_IDS)}"
        settings = kvbm_settings(options, pools, disk_dir, namespace)
    extra: dict[str, Any] = {"bench_on_request_finished": on_request_finished}
    if settings is not None:
        extra["kvbm"] = settings
    llm_args = LlmArgsLike(
        model=model_config.name,
        kv_cache_config=KvCacheConfigLike(tokens_per_block=options.tokens_per_block),
        tensor_parallel_size=options.tp,
        extra=extra,
    )
    connector = _connector_classes(with_kvbm)
    try:
        if options.tp > 1:
            return run_tp_bench(options, workload, model_config, pool_config, connector, llm_args)
        started = time.perf_counter()
        executor = Executor(model_config, pool_config, connector, llm_args=llm_args,
                            max_batch_size=max(8, options.sessions))
        try:
            result = executor.run(workload)
            wall_s = time.perf_counter() - started
            if before_shutdown is not None:
                before_shutdown(executor)
            outcome = RunOutcome(result, wall_s)
            if with_kvbm:
                outcome.stats, outcome.latencies = leader_stats(executor.scheduler)
                outcome.kvbm_config = settings
                # Only a throw-away disk directory may have its slots overwritten by the probe.
                outcome.transfer_rates = probe_transfers(executor.worker.core, with_disk=temp_dir is not None)
        finally:
            executor.close()
        return outcome
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _connector_classes(with_kvbm: bool) -> tuple[type, type]:
    from kvbm_trtllm import bench_connectors

    if with_kvbm:
        return bench_connectors.BenchKvbmLeader, bench_connectors.BenchKvbmWorker
    return bench_connectors.BenchNullScheduler, bench_connectors.BenchNullWorker


def warm_up(options: ResolvedBenchOptions) -> None:
    """One short request through the model, so one-time start-up costs land in neither run."""
    from kvbm_trtllm.executor import Executor, ModelConfig, PoolConfig
    from kvbm_trtllm.executor.workloads import RequestSpec, Workload

    model_config = ModelConfig(device=options.device, name="bench-warm-up", seed=options.seed,
                               **options.model_preset)
    num_tokens = 2 * options.tokens_per_block
    prompt = tuple(1 + i % (model_config.vocab_size - 1) for i in range(num_tokens))
    pool_config = PoolConfig(num_blocks=4, tokens_per_block=options.tokens_per_block)
    Executor(model_config, pool_config, None).run(Workload("warm-up", (RequestSpec(0, prompt, 2),)))
