"""``kvbm bench``: one workload through the reference executor, without kvbm and with it.

Which process: the ``kvbm`` command (or a test); TP>1 runs one spawned process per rank.

Operations:
- ``BenchOptions``: what to run (workload, model size, device, TP, tier sizes, the GPU pool)
  and where to write; ``BenchOptions.resolve() -> ResolvedBenchOptions`` fills the
  device-dependent defaults (model, device and the workload sizes are then set) and raises
  :class:`BenchError` naming a bad option and its fix. Everything below takes resolved options.
- ``build_workload(options) -> (Workload, round_of)``: the requests and each one's round
  (a conversation turn, a question round, a wave of prefix requests).
- ``run_once(options, workload, with_kvbm, ...) -> RunOutcome``: one executor run, with
  ``KvbmConnectorLeader/Worker`` (G2 in memory, G3 in a temporary directory, in-process
  discovery) or with the ``NullConnector`` baseline; the kvbm run also returns the leader's
  stats.
- ``run_bench(options, ...) -> BenchReport``: both runs, the per-round TTFT table, hit rates
  per tier, bytes moved and transfer rates, and whether the outputs are identical (they must
  be: loaded KV is bit-identical to recomputed KV); ``write_report`` saves ``bench.json`` and
  ``bench.png``.

The GPU pool is sized below the workload's working set on purpose, so reuse across rounds has
to come from kvbm's tiers rather than the engine's own prefix cache.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_discovery.local_servers import free_port
from kvbm_trtllm.bench_checks import check_before_runs, check_tiers

__all__ = [
    "BenchError",
    "BenchOptions",
    "ResolvedBenchOptions",
    "MODEL_PRESETS",
    "WORKLOADS",
    "RunOutcome",
    "BenchReport",
    "build_workload",
    "size_pools",
    "round_rows",
    "format_report",
    "run_once",
    "run_bench",
    "write_report",
]

WORKLOADS = ("multi-turn", "doc-qa", "prefix")

# name -> ModelConfig fields. ``small`` is sized so prefill compute dominates on a 2-core CPU
# while a round still takes seconds; ``8b`` is Llama-3-8B's shape for a GPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=512, tile_rows=32, tile_keys=32),
    "small": dict(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                  intermediate_size=1536, vocab_size=4096, tile_rows=64, tile_keys=128),
    "medium": dict(num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=64,
                   intermediate_size=2816, vocab_size=8192, tile_rows=64, tile_keys=64),
    "8b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256, tile_rows=128, tile_keys=256,
               dtype="bfloat16"),
}


class BenchError(ValueError):
    """A bad bench option: names it and the fix."""


@dataclass(frozen=True)
class BenchOptions:
    workload: str = "multi-turn"
    model: str | None = None  # None: "small" on the CPU, "8b" on a GPU
    device: str | None = None  # None: "cuda" when a GPU is visible, else "cpu"
    tp: int = 1
    sessions: int | None = None  # conversations / documents / distinct prefixes
    rounds: int | None = None  # turns / questions per document / waves of prefix requests
    context_tokens: int | None = None  # system prompt / document / shared prefix
    turn_tokens: int | None = None  # user message (and assistant reply) / question / suffix
    max_new_tokens: int = 4
    tokens_per_block: int = 32
    gpu_blocks: int | None = None  # None: ~2 of the longest requests, at most 1/4 of the working set
    cpu_blocks: int | None = None  # None: half of the working set
    disk_blocks: int | None = None  # None: all of it
    cpu_cache_gb: float | None = None
    disk_cache_gb: float | None = None
    disk_dir: str | None = None  # None: a temporary directory, removed afterwards
    tiers: tuple[str, ...] = ("cpu", "disk")
    disk_offload_filter: bool = False  # Dynamo's filter: only blocks hit twice go to disk
    baseline: bool = True
    metrics_port: int | None = None
    seed: int = 0
    output_dir: str = "kvbm-bench"

    def resolve(self) -> ResolvedBenchOptions:
        """Fill the defaults that depend on the machine; check every option."""
        device = self.device or _default_device()
        _check_device(device)
        model = self.model or ("8b" if device.startswith("cuda") else "small")
        if model not in MODEL_PRESETS:
            raise BenchError(f"--model {model!r} is unknown; choose one of {', '.join(MODEL_PRESETS)}")
        if self.workload not in WORKLOADS:
            raise BenchError(f"--workload {self.workload!r} is unknown; choose one of {', '.join(WORKLOADS)}")
        on_gpu = device.startswith("cuda")
        sizes = _default_sizes(self.workload, on_gpu, model == "tiny")
        values = {f.name: getattr(self, f.name) for f in fields(BenchOptions)}
        values.update(
            device=device,
            model=model,
            sessions=sizes["sessions"] if self.sessions is None else self.sessions,
            rounds=sizes["rounds"] if self.rounds is None else self.rounds,
            context_tokens=sizes["context_tokens"] if self.context_tokens is None else self.context_tokens,
            turn_tokens=sizes["turn_tokens"] if self.turn_tokens is None else self.turn_tokens,
        )
        resolved = ResolvedBenchOptions(**values)
        resolved._check()
        return resolved

    def _check(self) -> None:
        positive = {
            "--tp": self.tp, "--sessions": self.sessions, "--rounds": self.rounds,
            "--context-tokens": self.context_tokens, "--turn-tokens": self.turn_tokens,
            "--max-new-tokens": self.max_new_tokens, "--tokens-per-block": self.tokens_per_block,
        }
        for name, value in positive.items():
            if value is None or value < 1:
                raise BenchError(f"{name} {value} must be a whole number >= 1")
        for name, value in (("--gpu-blocks", self.gpu_blocks), ("--cpu-blocks", self.cpu_blocks),
                            ("--disk-blocks", self.disk_blocks)):
            if value is not None and value < 0:
                raise BenchError(f"{name} {value} must be >= 0")
        for name, size in (("--cpu-cache-gb", self.cpu_cache_gb), ("--disk-cache-gb", self.disk_cache_gb)):
            if size is not None and not size >= 0:
                raise BenchError(f"{name} {size} must be a number of GB >= 0")
        unknown = [t for t in self.tiers if t not in ("cpu", "disk")]
        if unknown:
            raise BenchError(f"--tiers {','.join(self.tiers)}: unknown tier {unknown[0]!r}; use cpu, disk or cpu,disk")
        if "disk" in self.tiers and "cpu" not in self.tiers:
            raise BenchError("--tiers disk needs the cpu tier too (a disk tier is fed from host "
                             "memory, as in Dynamo's KVBM); use --tiers cpu,disk")
        preset = MODEL_PRESETS[str(self.model)]
        if preset["num_kv_heads"] % self.tp:
            raise BenchError(f"--tp {self.tp} must divide the {self.model} model's "
                             f"{preset['num_kv_heads']} KV heads")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise BenchError(f"--metrics-port {self.metrics_port} must be a TCP port (0 picks a free one)")

    @property
    def model_preset(self) -> dict[str, Any]:
        return MODEL_PRESETS[str(self.model)]


@dataclass(frozen=True, kw_only=True)
class ResolvedBenchOptions(BenchOptions):
    """``BenchOptions`` after ``resolve()``: the machine-dependent defaults are filled in.

    Only ``resolve()`` should build one; it has checked every option. The fields keep their
    places, so ``asdict`` (the ``options`` of ``bench.json``) is unchanged.
    """

    model: str
    device: str
    sessions: int
    rounds: int
    context_tokens: int
    turn_tokens: int


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise BenchError(f"--device {device!r} is unknown; use cpu or cuda")
    import torch

    if not torch.cuda.is_available():
        raise BenchError("--device cuda but no CUDA GPU is visible (or torch is a CPU build); use --device cpu")


def _default_sizes(workload: str, on_gpu: bool, is_tiny: bool) -> dict[str, int]:
    if is_tiny:
        return dict(sessions=4, rounds=3, context_tokens=96, turn_tokens=32)
    scale = 2 if on_gpu else 1
    if workload == "multi-turn":
        return dict(sessions=6, rounds=4, context_tokens=1024 * scale, turn_tokens=128 * scale)
    if workload == "doc-qa":
        return dict(sessions=6, rounds=4, context_tokens=1536 * scale, turn_tokens=64)
    return dict(sessions=6, rounds=4, context_tokens=1024 * scale, turn_tokens=64)


# ---- workload ------------------------------------------------------------------------------


def build_workload(options: ResolvedBenchOptions) -> tuple[Any, dict[int, int]]:
    from kvbm_trtllm.executor import long_document_qa, multi_turn_chat, prefix_repetition

    o = options
    vocab = o.model_preset["vocab_size"]
    if o.workload == "multi-turn":
        workload = multi_turn_chat(
            num_conversations=o.sessions, num_turns=o.rounds, system_tokens=o.context_tokens,
            user_tokens=o.turn_tokens, assistant_tokens=o.turn_tokens, max_new_tokens=o.max_new_tokens,
            vocab_size=vocab, shared_system_prompt=False, seed=o.seed,
        )
    elif o.workload == "doc-qa":
        workload = long_document_qa(
            num_documents=o.sessions, document_tokens=o.context_tokens, num_questions=o.rounds,
            question_tokens=o.turn_tokens, max_new_tokens=o.max_new_tokens, vocab_size=vocab, seed=o.seed,
        )
    else:
        workload = prefix_repetition(
            num_prefixes=o.sessions, prefix_tokens=o.context_tokens, num_requests=o.sessions * o.rounds,
            suffix_tokens=o.turn_tokens, max_new_tokens=o.max_new_tokens, vocab_size=vocab,
            spacing_iterations=1, seed=o.seed,
        )
    # Every generator numbers requests round by round, ``sessions`` per round.
    round_of = {r.request_id: r.request_id // o.sessions for r in workload.requests}
    return workload, round_of


def _blocks(num_tokens: int, tokens_per_block: int) -> int:
    return -(-num_tokens // tokens_per_block)


def working_set_blocks(workload: Any, tokens_per_block: int) -> int:
    """Distinct full prompt blocks of the workload (what a cache would have to hold)."""
    from kvbm_core.hashing import block_hashes

    seen: set[int] = set()
    for r in workload.requests:
        seen.update(block_hashes(r.prompt, tokens_per_block, 0))
    return len(seen)


def size_pools(options: ResolvedBenchOptions, workload: Any) -> dict[str, int]:
    """GPU pool and tier sizes in blocks: the GPU pool well below the working set."""
    t = options.tokens_per_block
    longest = max(_blocks(len(r.prompt) + r.max_new_tokens, t) for r in workload.requests)
    working_set = working_set_blocks(workload, t)
    gpu = options.gpu_blocks if options.gpu_blocks is not None else min(2 * longest + 2, max(longest, working_set // 4))
    if gpu < longest:
        raise BenchError(
            f"--gpu-blocks {gpu} cannot hold the longest request ({longest} blocks of {t} tokens); "
            f"raise it to at least {longest} or shorten the prompts"
        )
    cpu = options.cpu_blocks if options.cpu_blocks is not None else max(longest, working_set // 2)
    disk = options.disk_blocks if options.disk_blocks is not None else working_set + longest
    return {
        "gpu": gpu,
        "cpu": cpu if "cpu" in options.tiers else 0,
        "disk": disk if "disk" in options.tiers else 0,
        "working_set": working_set,
        "longest_request": longest,
    }


# ---- one run --------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    result: Any  # RunResult
    wall_s: float
    stats: dict[str, float] | None = None  # the leader's counters and gauges (kvbm runs)
    latencies: dict[str, dict[str, float]] | None = None  # sum/count per histogram
    kvbm_config: dict[str, Any] | None = None
    transfer_rates: dict[str, dict[str, float | str]] | None = None  # see probe_transfers


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
            from kvbm_trtllm.bench_tp import run_tp_bench

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
                outcome.transfer_rates = probe_transfers(executor.worker, with_disk=temp_dir is not None)
        finally:
            executor.close()
        return outcome
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def leader_stats(leader: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The leader's counters and gauges, and each latency histogram's sum and count."""
    stats = leader.stats
    server = getattr(leader, "metrics_server", None)
    if server is not None:
        histograms = server.collector.update_histograms()
        latencies = {n: {"sum_s": h.total_s, "count": h.num_observed} for n, h in histograms.items()}
    else:
        latencies = {n: {"sum_s": math.fsum(v), "count": len(v)} for n, v in stats.take_latencies().items()}
    return stats.snapshot(), latencies


PROBE_JOB_ID = 1 << 48  # far above the planner's job ids
# Writes first, so the reads that follow find blocks written under the hashes they name.
_PROBE_ORDER = (("gpu", "cpu"), ("cpu", "disk"), ("gpu", "disk"), ("cpu", "gpu"), ("disk", "gpu"),
                ("disk", "cpu"))


def probe_transfers(
    worker: Any, *, with_disk: bool, max_blocks: int = 64, repeats: int = 3,
) -> dict[str, dict[str, float | str]]:
    """Time one job of ``max_blocks`` blocks per direction through the worker's own handlers.

    Runs after the workload, when the engine is idle: best of ``repeats``, wall clock from
    submit to the last result, so it is the rate a job gets from the tier (the planner's
    latency histograms also count the wait for the forward pass). Overwrites the first slots
    of each tier. Directions that fail are reported with ``"error"``.
    """
    from kvbm_core.transfer import TransferJob

    core = getattr(worker, "core", None)
    engine, storages, layout = (getattr(core, a, None) for a in ("engine", "storages", "layout"))
    if engine is None or not storages or layout is None:
        return {}
    holding = getattr(core, "holding_engine", None)
    rates: dict[str, dict[str, float | str]] = {}
    job_ids = itertools.count(PROBE_JOB_ID)
    for src, dst in _PROBE_ORDER:
        if (src, dst) not in engine.pairs or (not with_disk and "disk" in (src, dst)):
            continue
        n = min(max_blocks, storages[src].num_slots, storages[dst].num_slots)
        if n <= 0:
            continue
        ids = tuple(range(n))
        hashes = tuple(range(PROBE_JOB_ID, PROBE_JOB_ID + n))
        best = math.inf
        error: str | None = None
        for _ in range(repeats):
            job = TransferJob(next(job_ids), src, dst, ids, ids, hashes)
            # The worker's poller thread drains the engine too; hold it off so this job's
            # result comes back here and not to a worker that never asked for it.
            with holding() if holding else contextlib.nullcontext():
                started = time.perf_counter()
                engine.submit([job], None)
                results = engine.wait(timeout=60)
                elapsed = time.perf_counter() - started
            failed = [r for r in results if not r.ok]
            if failed or not results:
                error = failed[0].error if failed else "no result within 60 s"
                break
            best = min(best, elapsed)
        num_bytes = n * layout.bytes_per_block
        key = f"{src}->{dst}"
        if error is not None:
            rates[key] = {"blocks": n, "bytes": num_bytes, "error": error}
        else:
            rates[key] = {"blocks": n, "bytes": num_bytes, "seconds": best, "gb_per_s": num_bytes / best / 1e9}
    return rates


def _connector_classes(with_kvbm: bool) -> tuple[type, type]:
    from kvbm_trtllm import bench_connectors

    if with_kvbm:
        return bench_connectors.BenchKvbmLeader, bench_connectors.BenchKvbmWorker
    return bench_connectors.BenchNullScheduler, bench_connectors.BenchNullWorker


# ---- report ---------------------------------------------------------------------------------


@dataclass
class RoundRow:
    round: int
    num_requests: int
    num_prompt_tokens: int
    ttft_without_s: float | None
    ttft_with_s: float
    kvbm_hit_tokens: int
    device_hit_tokens: int

    @property
    def speedup(self) -> float | None:
        if self.ttft_without_s is None or self.ttft_with_s <= 0:
            return None
        return self.ttft_without_s / self.ttft_with_s


@dataclass
class BenchReport:
    options: ResolvedBenchOptions
    pools: dict[str, int]
    rounds: list[RoundRow]
    with_kvbm: RunOutcome
    without_kvbm: RunOutcome | None
    outputs_match: bool | None
    files: dict[str, str] = field(default_factory=dict)

    # -- what the kvbm run moved and where its hits came from --
    def tier_tokens(self) -> dict[str, int]:
        r = self.with_kvbm.result
        stats = self.with_kvbm.stats or {}
        t = self.options.tokens_per_block
        host = int(stats.get("onboard_blocks_h2d", 0)) * t
        disk = int(stats.get("onboard_blocks_d2d", 0)) * t
        return {
            "gpu": r.num_device_hit_tokens,
            "host": host,
            "disk": disk,
            "computed": r.num_computed_prompt_tokens,
            "prompt": r.num_prompt_tokens,
            "kvbm_reported": r.num_connector_hit_tokens,
        }

    def transfers(self) -> dict[str, Any]:
        stats = self.with_kvbm.stats or {}
        lat = self.with_kvbm.latencies or {}
        jobs = {}
        for kind in ("offload", "onboard"):
            hist = lat.get(f"{kind}_latency_seconds", {})
            count = hist.get("count", 0)
            jobs[kind] = {"jobs": count, "mean_latency_s": hist.get("sum_s", 0.0) / count if count else 0.0}
        moved = {name: stats.get(name, 0) for name in (
            "offload_bytes_d2h", "offload_bytes_h2d", "offload_bytes_d2d", "onboard_bytes_h2d",
            "onboard_bytes_d2d")}
        return {"bytes": moved, "jobs": jobs, "probe": self.with_kvbm.transfer_rates or {}}

    @property
    def mean_speedup(self) -> float | None:
        """Mean TTFT without kvbm over mean TTFT with it, rounds after the first."""
        later = [r for r in self.rounds if r.round > 0]
        if self.without_kvbm is None or not later:
            return None
        without = statistics.fmean(r.ttft_without_s for r in later if r.ttft_without_s is not None)
        with_ = statistics.fmean(r.ttft_with_s for r in later)
        return without / with_ if with_ > 0 else None

    def to_json(self) -> dict[str, Any]:
        def run_json(outcome: RunOutcome | None) -> dict[str, Any] | None:
            if outcome is None:
                return None
            r = outcome.result
            return {
                "wall_s": outcome.wall_s,
                "summary": r.summary(),
                "requests": [
                    {"request_id": q.request_id, "prompt_len": q.prompt_len, "ttft_s": q.ttft_s,
                     "device_hit_tokens": q.num_device_hit_tokens,
                     "kvbm_hit_tokens": q.num_connector_hit_tokens}
                    for q in r.requests.values()
                ],
                "kvbm_stats": outcome.stats,
                "kvbm_latencies": outcome.latencies,
                "kvbm_config": outcome.kvbm_config,
            }

        return {
            "kvbm_bench": 1,
            "options": asdict(self.options),
            "pools_blocks": self.pools,
            "rounds": [{**asdict(r), "speedup": r.speedup} for r in self.rounds],
            "mean_speedup_after_first_round": self.mean_speedup,
            "tier_tokens": self.tier_tokens(),
            "transfers": self.transfers(),
            "outputs_match": self.outputs_match,
            "with_kvbm": run_json(self.with_kvbm),
            "without_kvbm": run_json(self.without_kvbm),
            "machine": _machine(),
        }


def _machine() -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def round_rows(workload: Any, round_of: dict[int, int], with_kvbm: Any, without_kvbm: Any | None) -> list[RoundRow]:
    rows = []
    for number in sorted(set(round_of.values())):
        ids = [rid for rid, rnd in round_of.items() if rnd == number]
        reqs = [with_kvbm.requests[i] for i in ids]
        rows.append(RoundRow(
            round=number,
            num_requests=len(ids),
            num_prompt_tokens=sum(q.prompt_len for q in reqs),
            ttft_without_s=(statistics.fmean(without_kvbm.requests[i].ttft_s for i in ids)
                            if without_kvbm is not None else None),
            ttft_with_s=statistics.fmean(q.ttft_s for q in reqs),
            kvbm_hit_tokens=sum(q.num_connector_hit_tokens for q in reqs),
            device_hit_tokens=sum(q.num_device_hit_tokens for q in reqs),
        ))
    return rows


def run_bench(
    options: BenchOptions,
    *,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> BenchReport:
    options = options.resolve()
    workload, round_of = build_workload(options)
    pools = size_pools(options, workload)
    check_tiers(options, pools)
    settings = kvbm_settings(options, pools, tempfile.gettempdir(), "check")
    check_before_runs(options, pools, settings)  # what would fail fails before any run
    if options.tp == 1:
        warm_up(options)
    outcomes: dict[bool, RunOutcome] = {}
    for with_kvbm in ([False, True] if options.baseline else [True]):
        label = "with kvbm   " if with_kvbm else "without kvbm"
        with _progress(len(workload.requests), label, show_progress) as bar:
            outcomes[with_kvbm] = run_once(options, workload, pools, with_kvbm, on_request_finished=bar.tick)
            bar.finish()  # TP ranks run in other processes and cannot tick it
        log(f"{label.strip()}: {outcomes[with_kvbm].wall_s:.1f} s")
    with_run, without_run = outcomes[True], outcomes.get(False)
    matches = None if without_run is None else with_run.result.outputs == without_run.result.outputs
    rows = round_rows(workload, round_of, with_run.result, without_run.result if without_run else None)
    return BenchReport(options, pools, rows, with_run, without_run, matches)


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


class _progress:
    """A tqdm bar ticked once per finished request (nothing is shown when hidden)."""

    def __init__(self, total: int, label: str, is_shown: bool) -> None:
        self.bar = None
        self.tick: Callable[[], None] | None = None
        if is_shown:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="req", leave=True, dynamic_ncols=True)
            self.tick = self.bar.update

    def __enter__(self) -> _progress:
        return self

    def finish(self) -> None:
        if self.bar is not None and self.bar.n < self.bar.total:
            self.bar.update(self.bar.total - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def write_report(report: BenchReport, output_dir: Path) -> dict[str, str]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "bench.json"
    png_path = output_dir / "bench.png"
    json_path.write_text(json.dumps(report.to_json(), indent=2, default=_json_default) + "\n")
    plot_rounds(report, png_path)
    report.files = {"json": str(json_path), "png": str(png_path)}
    return report.files


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def plot_rounds(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round + 1 for r in report.rounds]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    # Every round has a time without kvbm exactly when the baseline ran.
    without_ms = [r.ttft_without_s * 1000 for r in report.rounds if r.ttft_without_s is not None]
    if report.without_kvbm is not None and len(without_ms) == len(rounds):
        ax.plot(rounds, without_ms, "o-", color="#888888",
                label="without kvbm (recompute)")
    tiers = " + ".join({"cpu": "G2 host", "disk": "G3 disk"}[t] for t in report.options.tiers)
    ax.plot(rounds, [r.ttft_with_s * 1000 for r in report.rounds], "o-", color="#76b900",
            label=f"with kvbm ({tiers})")
    o = report.options
    ax.set_title(f"kvbm bench: {o.workload}, model {o.model}, {o.device}, TP={o.tp}")
    ax.set_xlabel({"multi-turn": "turn", "doc-qa": "question round"}.get(o.workload, "round"))
    ax.set_ylabel("mean TTFT (ms)")
    ax.set_xticks(rounds)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_report(report: BenchReport) -> str:
    o = report.options
    lines = []
    rows = report.rounds
    header = f"{'round':>5}  {'reqs':>4}  {'prompt tok':>10}  {'TTFT without':>12}  {'TTFT with':>10}  {'speedup':>7}  {'kvbm hits':>9}"
    lines += [header, "-" * len(header)]
    for r in rows:
        without = f"{r.ttft_without_s * 1000:10.0f} ms" if r.ttft_without_s is not None else f"{'-':>13}"
        speed = f"{r.speedup:6.2f}x" if r.speedup is not None else f"{'-':>7}"
        hits = r.kvbm_hit_tokens / r.num_prompt_tokens if r.num_prompt_tokens else 0.0
        lines.append(f"{r.round + 1:>5}  {r.num_requests:>4}  {r.num_prompt_tokens:>10}  {without:>12}  "
                     f"{r.ttft_with_s * 1000:7.0f} ms  {speed:>7}  {hits:>8.0%}")
    if report.mean_speedup is not None:
        lines.append(f"mean TTFT after the first round: {report.mean_speedup:.2f}x faster with kvbm")
    tiers = report.tier_tokens()
    prompt = tiers["prompt"] or 1
    stats = report.with_kvbm.stats or {}
    lines.append("")
    lines.append("where the prompt tokens of the kvbm run came from:")
    for label, key in (("GPU prefix cache (G1)", "gpu"), ("host memory (G2)", "host"), ("disk (G3)", "disk"),
                       ("computed", "computed")):
        lines.append(f"  {label:<22} {tiers[key]:>9} tokens  {tiers[key] / prompt:6.1%}")
    lines.append(f"  hit rate of kvbm lookups: host {stats.get('host_cache_hit_rate', 0.0):.1%}, "
                 f"disk {stats.get('disk_cache_hit_rate', 0.0):.1%}")
    transfers = report.transfers()
    moved = transfers["bytes"]
    lines.append("")
    lines.append("bytes moved: " + ", ".join(
        f"{label} {_mb(moved[key])}" for label, key in (
            ("GPU->host", "offload_bytes_d2h"), ("host->disk", "offload_bytes_h2d"),
            ("host->GPU", "onboard_bytes_h2d"), ("disk->GPU", "onboard_bytes_d2d"))))
    for kind in ("offload", "onboard"):
        j = transfers["jobs"][kind]
        lines.append(f"  {kind} jobs: {j['jobs']}, mean {j['mean_latency_s'] * 1000:.0f} ms from plan to "
                     "done on all ranks (includes waiting for the forward pass)")
    probe = transfers["probe"]
    if probe:
        lines.append("transfer rate per job (" + f"{next(iter(probe.values()))['blocks']} blocks, "
                     f"{_mb(next(iter(probe.values()))['bytes'])}, idle engine):")
        for direction, rate in probe.items():
            shown = f"{rate['gb_per_s']:.2f} GB/s" if "gb_per_s" in rate else f"failed: {rate['error']}"
            lines.append(f"  {direction:<10} {shown}")
    if report.outputs_match is not None:
        lines.append("")
        lines.append("outputs with kvbm == outputs without: "
                     + ("yes (loaded KV is bit-identical)" if report.outputs_match else "NO"))
    settings = report.with_kvbm.kvbm_config or {}
    if settings.get("metrics"):
        lines.append(f"the leader served Prometheus metrics on port {settings.get('metrics_port')}")
    lines.append(f"GPU pool {report.pools['gpu']} blocks of {o.tokens_per_block} tokens; working set "
                 f"{report.pools['working_set']} blocks; host tier {report.pools['cpu']}, disk tier "
                 f"{report.pools['disk']} blocks")
    return "\n".join(lines)


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB"
