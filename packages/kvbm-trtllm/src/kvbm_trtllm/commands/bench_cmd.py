"""``kvbm bench``: the options of :mod:`kvbm_trtllm.bench` on the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvbm_core.config import ConfigError
from kvbm_trtllm.commands.common import CommandError, UsageError

__all__ = ["add_parser", "run", "options_from_args"]


def add_parser(subparsers) -> None:
    from kvbm_trtllm.bench_options import MODEL_PRESETS, WORKLOADS

    parser = subparsers.add_parser(
        "bench",
        help="run a workload through the reference executor with and without kvbm; compare TTFT",
        description="Run a workload through kvbm's reference executor (a stand-in for "
        "TensorRT-LLM's PyTorch backend) twice: without kvbm (recompute) and with kvbm (host "
        "memory and disk tiers). Prints per-round TTFT, hit rates per tier, bytes moved and "
        "transfer rates; writes bench.json and bench.png. The GPU pool is kept smaller than "
        "the working set, so reuse has to come from kvbm's tiers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="multi-turn",
                   help="multi-turn chat, long-document QA, or requests repeating shared prefixes")
    w.add_argument("--sessions", type=int, help="conversations / documents / distinct prefixes")
    w.add_argument("--rounds", type=int, help="turns / questions per document / waves of requests")
    w.add_argument("--context-tokens", type=int, help="system prompt / document / shared prefix length")
    w.add_argument("--turn-tokens", type=int, help="user message and reply / question / suffix length")
    w.add_argument("--max-new-tokens", type=int, default=4)
    w.add_argument("--seed", type=int, default=0)
    m = parser.add_argument_group("engine")
    m.add_argument("--model", choices=list(MODEL_PRESETS), help="model size (default: small on "
                   "the CPU, 8b on a GPU; random weights)")
    m.add_argument("--device", help="cpu or cuda (default: cuda when a GPU is visible)")
    m.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one process each; "
                   "TP>1 starts local etcd and nats-server)")
    m.add_argument("--tokens-per-block", type=int, default=32)
    m.add_argument("--gpu-blocks", type=int, help="GPU pool size (default: two of the longest "
                   "requests, well below the working set)")
    t = parser.add_argument_group("kvbm tiers")
    t.add_argument("--tiers", default="cpu,disk", help="cpu or cpu,disk")
    t.add_argument("--cpu-blocks", type=int, help="host tier size in blocks (default: half the working set)")
    t.add_argument("--disk-blocks", type=int, help="disk tier size in blocks (default: the working set)")
    t.add_argument("--cpu-cache-gb", type=float, help="host tier size in GB (instead of --cpu-blocks)")
    t.add_argument("--disk-cache-gb", type=float, help="disk tier size in GB (instead of --disk-blocks)")
    t.add_argument("--disk-dir", help="disk tier directory (default: a temporary one, removed after)")
    t.add_argument("--disk-offload-filter", action="store_true",
                   help="keep Dynamo's filter (only blocks hit once in host memory go to disk)")
    t.add_argument("--metrics-port", type=int, help="serve the leader's Prometheus metrics here "
                   "during the kvbm run (0: a free port)")
    o = parser.add_argument_group("output")
    o.add_argument("-o", "--output-dir", default="kvbm-bench", help="where bench.json and bench.png go")
    o.add_argument("--no-baseline", action="store_true", help="skip the run without kvbm")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def options_from_args(args: argparse.Namespace):
    from kvbm_trtllm.bench_options import BenchOptions

    tiers = tuple(t.strip() for t in args.tiers.split(",") if t.strip())
    return BenchOptions(
        workload=args.workload, model=args.model, device=args.device, tp=args.tp,
        sessions=args.sessions, rounds=args.rounds, context_tokens=args.context_tokens,
        turn_tokens=args.turn_tokens, max_new_tokens=args.max_new_tokens,
        tokens_per_block=args.tokens_per_block, gpu_blocks=args.gpu_blocks,
        cpu_blocks=args.cpu_blocks, disk_blocks=args.disk_blocks, cpu_cache_gb=args.cpu_cache_gb,
        disk_cache_gb=args.disk_cache_gb, disk_dir=args.disk_dir, tiers=tiers,
        disk_offload_filter=args.disk_offload_filter, baseline=not args.no_baseline,
        metrics_port=args.metrics_port, seed=args.seed, output_dir=args.output_dir,
    )


def run(args: argparse.Namespace) -> int:
    from kvbm_trtllm.bench import BenchError, format_report, run_bench, write_report

    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    try:
        options = options_from_args(args).resolve()
        _check_output_dir(output_dir)
        print(f"kvbm bench: {options.workload}, model {options.model} on {options.device}, "
              f"TP={options.tp}, {options.sessions} sessions x {options.rounds} rounds", flush=True)
        report = run_bench(options, show_progress=not args.no_progress)
    except (BenchError, ConfigError) as exc:  # a ConfigError: a tier refused what it was given
        raise UsageError(str(exc)) from None
    files = write_report(report, output_dir)
    print()
    print(format_report(report))
    print(f"\nwrote {files['json']} and {files['png']} ({time.perf_counter() - started:.0f} s in all)")
    if report.outputs_match is False:
        print("kvbm bench: outputs with kvbm differ from a full recompute: kvbm served wrong KV",
              file=sys.stderr)
        raise CommandError("outputs differ (see above)")
    return 0


def _check_output_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output-dir {path}: cannot create it ({exc.strerror})") from None
