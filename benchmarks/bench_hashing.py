"""Block hashing speed: a 128k-token prompt in 32-token blocks, Dynamo v1 scheme.

Prints a table (best and median of N runs, per input form) and writes JSON with ``--out``.
Target: under 2 ms for the whole prompt (it runs on the leader for every new request).

    python benchmarks/bench_hashing.py --runs 50 --out hashing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvbm_core.hashing import block_hashes, salt_hash

TARGET_MS = 2.0


def time_cases_ms(cases: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
    """Runs the cases round-robin, so that every case sees the same machine load."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(runs):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tokens", type=int, default=128 * 1024)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", help="write results as JSON to this file")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128_000, size=args.num_tokens, dtype=np.uint32)
    token_list = tokens.tolist()
    salt = salt_hash(model_id="bench")
    num_blocks = args.num_tokens // args.block_size
    cases = {
        "numpy uint32": lambda: block_hashes(tokens, args.block_size, salt),
        "numpy int64": lambda: block_hashes(tokens.astype(np.int64), args.block_size, salt),
        "python list": lambda: block_hashes(token_list, args.block_size, salt),
    }
    rows = []
    for name, samples in time_cases_ms(cases, args.runs).items():
        best = min(samples)
        rows.append(
            {
                "input": name,
                "best_ms": round(best, 3),
                "median_ms": round(statistics.median(samples), 3),
                "blocks_per_s": round(num_blocks / best * 1e3),
                "meets_target": best < TARGET_MS,
            }
        )

    print(
        f"block_hashes: {args.num_tokens} tokens, block size {args.block_size} ({num_blocks} blocks), best of {args.runs}"
    )
    print(f"{'input':<14} {'best ms':>9} {'median ms':>10} {'blocks/s':>12}  < {TARGET_MS} ms")
    for row in rows:
        print(
            f"{row['input']:<14} {row['best_ms']:>9.3f} {row['median_ms']:>10.3f} "
            f"{row['blocks_per_s']:>12,}  {'yes' if row['meets_target'] else 'NO'}"
        )
    if args.out:
        report = {
            "benchmark": "block_hashes",
            "num_tokens": args.num_tokens,
            "block_size": args.block_size,
            "runs": args.runs,
            "target_ms": TARGET_MS,
            "machine": {
                "python": platform.python_version(),
                "processor": platform.processor() or platform.machine(),
            },
            "results": rows,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
