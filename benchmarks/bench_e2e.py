"""End-to-end kvbm in the reference executor: identity, TTFT by source, overhead without reuse.

Sections (each writes its part of the JSON even if a later one fails):
- identity: greedy outputs with kvbm (G2; G2+G3) equal a full recompute, GPU pool too small.
  Batch-invariant kernels, so loaded KV bytes equal recomputed ones.
- ttft: one request whose prefix (8k/16k/32k tokens) was computed before, served by recompute,
  by a load from G2 (host memory) or from G3 (disk, after a restart). Fast kernels.
- noreuse: a workload with no reuse at all, with and without the connector (the cost of
  write-through offload). Fast kernels.

Prints tables and writes ``bench_e2e.json`` under ``--out``. ``--model tiny`` runs on a CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_trtllm.executor import Executor, ModelConfig, PoolConfig, long_document_qa
from kvbm_trtllm.executor.workloads import RequestSpec, Workload
from kvbm_trtllm.trtllm_api import KvCacheConfigLike, LlmArgsLike

T = 32
_namespaces = itertools.count()


def make_model(name: str, num_layers: int | None, invariant: bool) -> ModelConfig:
    if name == "8b":
        config = ModelConfig.llama_8b_shape(batch_invariant=invariant)
    else:
        config = ModelConfig.tiny(batch_invariant=invariant)
    return replace(config, num_layers=num_layers) if num_layers else config


def kvbm_executor(model, num_blocks, kvbm, reuse=True, **kwargs) -> Executor:
    args = LlmArgsLike(
        model=model.name,
        kv_cache_config=KvCacheConfigLike(tokens_per_block=T),
        extra={"kvbm": {"namespace": f"bench{next(_namespaces)}", **kvbm}},
    )
    pool = PoolConfig(num_blocks=num_blocks, tokens_per_block=T, enable_block_reuse=reuse)
    executor = Executor(model, pool, (KvbmConnectorLeader, KvbmConnectorWorker), llm_args=args, **kwargs)
    # A server pins its host tier before it takes traffic: time serving, not start-up.
    host = executor.worker.core.storages.get("cpu")
    if host is not None and hasattr(host, "wait_ready"):
        host.wait_ready()
    return executor


def close(executor: Executor) -> dict[str, Any]:
    stats = executor.scheduler.stats
    snapshot = dict(stats.snapshot())
    snapshot["latencies"] = stats.take_latencies()
    executor.worker.shutdown()
    executor.scheduler.shutdown()
    return snapshot


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- identity -------------------------------------------------------------------------------


def identity(model: ModelConfig, doc_tokens: int, tmp: Path) -> dict[str, Any]:
    workload = long_document_qa(
        num_documents=4, document_tokens=doc_tokens, num_questions=2, question_tokens=32,
        max_new_tokens=4, vocab_size=model.vocab_size, seed=11,
    )
    blocks_per_doc = doc_tokens // T + 2
    big = PoolConfig(num_blocks=8 * blocks_per_doc, tokens_per_block=T, enable_block_reuse=False)
    expected = Executor(model, big).run(workload).outputs
    rows = {}
    for name, kvbm in (
        ("G2", {"cpu_cache_override_num_blocks": 16 * blocks_per_doc}),
        ("G2+G3", {"cpu_cache_override_num_blocks": blocks_per_doc // 2,
                   "disk_cache_override_num_blocks": 16 * blocks_per_doc,
                   "disk_cache_dir": str(tmp / "identity"), "disable_disk_offload_filter": True}),
    ):
        executor = kvbm_executor(model, 2 * blocks_per_doc, kvbm)
        result = executor.run(workload)
        stats = close(executor)
        rows[name] = {
            "identical": result.outputs == expected,
            "connector_hit_tokens": result.num_connector_hit_tokens,
            "onboard_blocks_h2d": stats["onboard_blocks_h2d"],
            "onboard_blocks_d2d": stats["onboard_blocks_d2d"],
            "evicted_gpu_blocks": result.num_evicted_blocks,
        }
        print(f"identity {name:6s} {rows[name]}", flush=True)
    return rows


# ---- TTFT -----------------------------------------------------------------------------------


def prompt(rng, prefix, suffix_len, vocab):
    return tuple(prefix) + tuple(int(x) for x in rng.integers(1, vocab, suffix_len))


def one(request_id, tokens, after=None):
    return RequestSpec(request_id, tokens, max_new_tokens=1, after=after)


def ttft_for(model: ModelConfig, prefix_len: int, tmp: Path) -> dict[str, Any]:
    rng = np.random.default_rng(prefix_len)
    prefix = [int(x) for x in rng.integers(1, model.vocab_size, prefix_len)]
    warm, probe = prompt(rng, prefix, 32, model.vocab_size), prompt(rng, prefix, 32, model.vocab_size)
    num_blocks = 2 * (prefix_len // T + 4)
    row: dict[str, Any] = {"prefix_tokens": prefix_len}

    base = Executor(model, PoolConfig(num_blocks=num_blocks, tokens_per_block=T, enable_block_reuse=False))
    base.run(Workload("warmup", (one(0, warm),)))
    sync()
    row["recompute_s"] = base.run(Workload("probe", (one(1, probe),))).requests[1].ttft_s
    del base

    cpu = {"cpu_cache_override_num_blocks": num_blocks}
    executor = kvbm_executor(model, num_blocks, cpu, reuse=False)
    executor.run(Workload("store", (one(0, warm),)))
    result = executor.run(Workload("load", (one(1, probe),)))
    stats = close(executor)
    row["g2_s"] = result.requests[1].ttft_s
    row["g2_loaded_tokens"] = result.num_connector_hit_tokens
    row["g2_bytes"] = stats["onboard_bytes_h2d"]
    lat = stats["latencies"]["onboard_latency_seconds"]
    row["g2_load_gbps"] = stats["onboard_bytes_h2d"] / sum(lat) / 1e9 if lat else None

    disk = {"cpu_cache_override_num_blocks": num_blocks, "disk_cache_override_num_blocks": num_blocks,
            "disk_cache_dir": str(tmp / f"ttft{prefix_len}"), "disable_disk_offload_filter": True}
    executor = kvbm_executor(model, num_blocks, disk, reuse=False)
    executor.run(Workload("store", (one(0, warm),)))
    for tick in range(200):  # offloads to disk advance with engine iterations: keep a trickle going
        if executor.scheduler.core.manager.num_pending_jobs == 0 and tick > 1:
            break
        executor.run(Workload("tick", (one(10 + tick, (7 + tick,) * 40),)))
    close(executor)  # a restart: G2 is gone, G3 persists
    executor = kvbm_executor(model, num_blocks, disk, reuse=False)
    result = executor.run(Workload("load", (one(1, probe),)))
    stats = close(executor)
    row["g3_s"] = result.requests[1].ttft_s
    row["g3_loaded_tokens"] = result.num_connector_hit_tokens
    lat = stats["latencies"]["onboard_latency_seconds"]
    row["g3_load_gbps"] = stats["onboard_bytes_d2d"] / sum(lat) / 1e9 if lat else None
    print(f"ttft {row}", flush=True)
    return row


# ---- no reuse -------------------------------------------------------------------------------


def noreuse(model: ModelConfig, num_requests: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    rng = np.random.default_rng(5)
    requests = tuple(
        RequestSpec(i, tuple(int(x) for x in rng.integers(1, model.vocab_size, prompt_len)), new_tokens)
        for i in range(num_requests)
    )
    workload = Workload("noreuse", requests)
    num_blocks = num_requests * ((prompt_len + new_tokens) // T + 2)
    pool = PoolConfig(num_blocks=num_blocks, tokens_per_block=T)
    tokens = num_requests * (prompt_len + new_tokens)
    rows: dict[str, list[float]] = {"none": [], "kvbm": []}
    for _ in range(2):  # alternate, so drift hits both alike
        sync()
        start = time.perf_counter()
        Executor(model, pool).run(workload)
        sync()
        rows["none"].append(time.perf_counter() - start)
        executor = kvbm_executor(model, num_blocks, {"cpu_cache_override_num_blocks": 2 * num_blocks})
        sync()
        start = time.perf_counter()
        executor.run(workload)
        sync()
        rows["kvbm"].append(time.perf_counter() - start)
        close(executor)
    best = {k: min(v) for k, v in rows.items()}
    out = {
        "tokens": tokens,
        "none_s": best["none"],
        "kvbm_s": best["kvbm"],
        "none_tok_s": tokens / best["none"],
        "kvbm_tok_s": tokens / best["kvbm"],
        "loss_pct": 100 * (best["kvbm"] - best["none"]) / best["none"],
        "runs": rows,
    }
    print(f"noreuse {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["tiny", "8b"], default="tiny")
    parser.add_argument("--identity-layers", type=int, default=None)
    parser.add_argument("--identity-doc-tokens", type=int, default=256)
    parser.add_argument("--prefixes", default="256,512")
    parser.add_argument("--noreuse", default="8,256,16", help="requests,prompt_len,new_tokens")
    parser.add_argument("--sections", default="identity,ttft,noreuse")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {"device": device, "model": args.model}
    tmp = Path(tempfile.mkdtemp(prefix="kvbm-bench-e2e-"))
    sections = args.sections.split(",")

    def save():
        (out_dir / "bench_e2e.json").write_text(json.dumps(report, indent=2, default=str))

    try:
        if "identity" in sections:
            model = make_model(args.model, args.identity_layers, invariant=True)
            report["identity"] = identity(model, args.identity_doc_tokens, tmp)
            save()
        fast = make_model(args.model, None, invariant=False)
        if "ttft" in sections:
            report["ttft"] = []
            for prefix_len in (int(p) for p in args.prefixes.split(",")):
                report["ttft"].append(ttft_for(fast, prefix_len, tmp))
                save()
        if "noreuse" in sections:
            n, p, g = (int(x) for x in args.noreuse.split(","))
            report["noreuse"] = noreuse(fast, n, p, g)
            save()
    finally:
        save()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndevice: {device}")
    for row in report.get("ttft", []):
        print(
            f"prefix {row['prefix_tokens']:>6}: recompute {row['recompute_s']*1e3:8.1f} ms | "
            f"G2 {row['g2_s']*1e3:8.1f} ms ({row['g2_load_gbps'] or 0:.1f} GB/s) | "
            f"G3 {row['g3_s']*1e3:8.1f} ms ({row['g3_load_gbps'] or 0:.1f} GB/s)"
        )


if __name__ == "__main__":
    main()
