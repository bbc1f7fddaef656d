"""Planner cost per iteration: 256 running requests in decode, block size 32.

Each iteration every request reports one new token (so about one in 32 completes a block and
gets a store planned), then the plan is built and the workers' results applied. Prints a table
and writes JSON. Target: well under 1 ms per iteration.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from kvbm_core.admission import FrequencyFilter
from kvbm_core.manager import BlockManager, TierSlots
from kvbm_core.transfer import JobResult


def run(num_requests: int, num_iterations: int, block_size: int, prompt_len: int) -> dict:
    rng = random.Random(0)
    manager = BlockManager(
        [TierSlots("cpu", 200_000), TierSlots("disk", 400_000, stores_from=("cpu", "gpu"))],
        block_size,
        admission=FrequencyFilter(),  # the leader's default disk admission
    )
    positions = {}
    next_block = 0
    for request_id in range(num_requests):
        # Staggered lengths, as in a live batch: blocks complete on different iterations.
        length = prompt_len + rng.randrange(block_size)
        prompt = [rng.randrange(32000) for _ in range(length)]
        manager.lookup(request_id, prompt, 0, salt=1)
        num_blocks = length // block_size + 1
        block_ids = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        manager.schedule(request_id, prompt, block_ids, 0, length, is_new=True)
        positions[request_id] = length
    manager.apply_results(0, [JobResult(j.job_id, True) for j in manager.build_plan().jobs])
    timings = []
    new_tokens = [[rng.randrange(32000)] for _ in range(num_requests)]
    for _ in range(num_iterations):
        start = time.perf_counter()
        for request_id, position in positions.items():
            new_block = [next_block] if position % block_size == 0 else []
            next_block += len(new_block)
            manager.schedule(request_id, new_tokens[request_id], new_block, position, 1)
            positions[request_id] = position + 1
        plan = manager.build_plan()
        manager.apply_results(0, [JobResult(j.job_id, True) for j in plan.jobs])
        timings.append(time.perf_counter() - start)
    timings.sort()
    return {
        "num_requests": num_requests,
        "iterations": num_iterations,
        "median_ms": timings[len(timings) // 2] * 1e3,
        "p99_ms": timings[int(len(timings) * 0.99)] * 1e3,
        "target_ms": 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--out", default="bench_planner.json")
    args = parser.parse_args()
    result = run(args.requests, args.iterations, args.block_size, args.prompt_len)
    print(f"{'requests':>9} {'median ms':>10} {'p99 ms':>8} {'target ms':>10}")
    print(
        f"{result['num_requests']:>9} {result['median_ms']:>10.3f} {result['p99_ms']:>8.3f} "
        f"{result['target_ms']:>10.1f}"
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
