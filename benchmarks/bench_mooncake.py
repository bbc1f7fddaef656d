"""Mooncake Store tier (G4) throughput: kvbm's handlers against plain Mooncake puts and gets.

Measured in one run against one local store (``mooncake_master`` + a store node on loopback,
TCP transport, started here):
- ``plain put`` / ``plain get``: the store client's own ``batch_put_from`` / ``batch_get_into``
  of the same values (header + block) from one registered buffer, in batches of
  ``--batch-blocks``: the ceiling for the tier.
- ``gpu->mooncake`` / ``mooncake->gpu``: the tier's handlers moving ``--blocks`` blocks in jobs
  of ``--batch-blocks``: gather from the pool (a CPU tensor without a GPU), header and xxh3
  checksum, put; get, verify every value, scatter into the pool.

Prints a table and writes JSON (``--out``). Needs kvbm-core, kvbm-tiers-mooncake, torch and
the Mooncake wheel::

    python benchmarks/bench_mooncake.py --out mooncake.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import time

import numpy as np

from kvbm_core.config import KvbmConfig
from kvbm_core.layout import KvLayout
from kvbm_core.testing import build_tier_rig, run_jobs
from kvbm_core.testing.rig import make_job
from kvbm_core.transfer import TransferJob
from kvbm_tiers_mooncake.client import StoreSettings, connect
from kvbm_tiers_mooncake.local_store import LocalMooncake
from kvbm_tiers_mooncake.value_format import HEADER_BYTES


def _layout(block_kib: int) -> KvLayout:
    # 8 layers x K,V x 8 heads x tokens x 128 head_dim, bf16; tokens chosen for the block size.
    tokens = max(1, block_kib * 1024 // (8 * 2 * 8 * 128 * 2))
    return KvLayout(num_layers=8, tokens_per_block=tokens, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def _plain(options: dict, num_blocks: int, value_bytes: int, batch: int, tag: str) -> tuple[float, float]:
    store = connect(StoreSettings.from_options(options), 0)
    buffer = np.random.default_rng(0).integers(0, 256, (batch, value_bytes), dtype=np.uint8)
    base = buffer.ctypes.data
    assert store.register_buffer(base, buffer.nbytes) == 0
    ptrs, sizes = [base + i * value_bytes for i in range(batch)], [value_bytes] * batch
    keys = [f"plain/{tag}/{i}" for i in range(num_blocks)]
    started = time.perf_counter()
    for start in range(0, num_blocks, batch):
        codes = store.batch_put_from(keys[start : start + batch], ptrs, sizes)
        assert all(c == 0 for c in codes), codes
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    for start in range(0, num_blocks, batch):
        codes = store.batch_get_into(keys[start : start + batch], ptrs, sizes)
        assert all(c == value_bytes for c in codes), codes
    get_s = time.perf_counter() - started
    store.unregister_buffer(base)
    store.close()
    return put_s, get_s


def _tier(options: dict, layout: KvLayout, num_blocks: int, batch: int, tag: str) -> tuple[float, float]:
    rig = build_tier_rig(
        "mooncake", layout, num_slots=num_blocks, num_gpu_blocks=num_blocks,
        config=KvbmConfig(model_id="bench"), device="cpu",
        options={**options, "mooncake_namespace": tag, "mooncake_batch_blocks": batch},
    )
    try:
        for tensor in rig.storages["gpu"].tensors:  # type: ignore[attr-defined]
            tensor.view(-1).copy_(tensor.new_empty(tensor.numel()).random_(0, 100))
        hashes = list(range(1, num_blocks + 1))

        def jobs(src: str, dst: str) -> list[TransferJob]:
            made = []
            for start in range(0, num_blocks, batch):
                ids = list(range(start, min(start + batch, num_blocks)))
                job = make_job(rig, src, dst, ids, ids)
                made.append(TransferJob(job.job_id, src, dst, job.src_ids, job.dst_ids,
                                        tuple(hashes[ids[0] : ids[-1] + 1])))
            return made

        timings = []
        for src, dst in (("gpu", "mooncake"), ("mooncake", "gpu")):
            batch_jobs = jobs(src, dst)
            started = time.perf_counter()
            results = run_jobs(rig, rig.handler(src, dst), [batch_jobs], 600)
            timings.append(time.perf_counter() - started)
            failed = [r.error for r in results.values() if not r.ok]
            assert not failed, failed[0]
        return timings[0], timings[1]
    finally:
        rig.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--block-kib", type=int, default=512)
    parser.add_argument("--batch-blocks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="mooncake.json")
    args = parser.parse_args()
    layout = _layout(args.block_kib)
    value_bytes = HEADER_BYTES + layout.bytes_per_block
    segment_mib = max(256, 3 * args.repeats * 2 * args.blocks * value_bytes // (1 << 20))
    store = LocalMooncake(segment_mib=segment_mib).start()
    rows: dict[str, list[float]] = {"plain put": [], "plain get": [], "gpu->mooncake": [], "mooncake->gpu": []}
    try:
        options = {**store.options, "mooncake_buffer_mib": 16}
        for repeat in range(args.repeats):
            put_s, get_s = _plain(options, args.blocks, value_bytes, args.batch_blocks, f"r{repeat}")
            tier_put_s, tier_get_s = _tier(options, layout, args.blocks, args.batch_blocks, f"t{repeat}")
            total = args.blocks * layout.bytes_per_block
            for name, seconds in zip(rows, (put_s, get_s, tier_put_s, tier_get_s), strict=True):
                rows[name].append(total / seconds / 1e9)
    finally:
        store.stop()
    gbps = {name: statistics.median(values) for name, values in rows.items()}
    ratio = {"gpu->mooncake": gbps["gpu->mooncake"] / gbps["plain put"],
             "mooncake->gpu": gbps["mooncake->gpu"] / gbps["plain get"]}
    print(f"{args.blocks} blocks of {layout.bytes_per_block >> 10} KiB, batches of {args.batch_blocks}, "
          f"median of {args.repeats}")
    print(f"{'path':<16}{'GB/s':>8}{'vs plain':>10}")
    for name, value in gbps.items():
        share = f"{ratio[name]:.0%}" if name in ratio else ""
        print(f"{name:<16}{value:>8.2f}{share:>10}")
    report = {
        "host": socket.gethostname(), "machine": platform.machine(), "python": sys.version.split()[0],
        "blocks": args.blocks, "bytes_per_block": layout.bytes_per_block, "batch_blocks": args.batch_blocks,
        "repeats": args.repeats, "gbps": gbps, "runs": rows, "vs_plain": ratio,
    }
    with open(args.out, "w") as out:
        json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
