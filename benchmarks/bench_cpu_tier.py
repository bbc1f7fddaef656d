"""G2 benchmark: GPU <-> pinned host throughput through kvbm_tiers_cpu's handlers.

For each block size and layout it moves ``--total-mib`` of blocks GPU -> host (offload), host
-> GPU (onboard) and both at once, through ``GpuToHostHandler`` / ``HostToGpuHandler``, and
compares with a plain single copy of the same size between a pinned host buffer and the GPU,
measured in the same run (the ceiling). Also times pinning the host buffer.

Layouts: ``fc`` is a fully contiguous pool (a block is one run); ``ls`` is a layer-separate
pool of ``--layers`` separately allocated layer tensors (a block is ``--layers`` pieces, one
kernel per layer); ``ls-carved`` has the layer tensors carved from one buffer (one kernel for
all layers). ``v2`` is a KVCacheManagerV2 layout (``kvbm_core.regions.RegionPool``): two layer
groups of ``--layers / 2`` layers each, one page region per group, the second group's pages a
random permutation of the first's (as a sliding-window group's are), moved with one
``index_select`` / ``index_copy_`` per region (``--layout v2`` runs only it). A layer-separate pool moves with one Triton kernel per staging buffer where
Triton is installed (one torch kernel per layer otherwise). Jobs hold ``--blocks-per-job`` blocks in random GPU order; host slots are
consecutive within a job (``scattered`` columns: every slot random, which the handlers move
with a zero-copy kernel where Triton and the driver allow it).

    python benchmarks/bench_cpu_tier.py --out results.json            # GPU
    python benchmarks/bench_cpu_tier.py --quick --out smoke.json       # CPU smoke test
    python benchmarks/bench_cpu_tier.py --layout v2 --sizes 128K,1M,2M,4M --out v2.json

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from kvbm_core import DevicePool, KvLayout, LayoutKind, TransferJob
from kvbm_core.regions import PageRegion, RegionPool, block_layout
from kvbm_tiers_cpu import (
    DEFAULT_STAGING_BYTES,
    GpuToHostHandler,
    HostToGpuHandler,
    PinnedHostStorage,
)

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@dataclass
class Row:
    layout: str
    block_bytes: int
    piece_bytes: int
    num_blocks: int
    kernel: str
    zero_copy: bool
    offload_gbps: float
    onboard_gbps: float
    both_gbps: float
    offload_scattered_gbps: float
    onboard_scattered_gbps: float
    offload_pct: float = 0.0
    onboard_pct: float = 0.0
    both_ratio: float = 0.0
    notes: list[str] = field(default_factory=list)


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, scale in (("K", KIB), ("M", MIB), ("G", GIB)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * scale)
    return int(text)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


# -- ceilings ---------------------------------------------------------------------------------


def measure_ceiling(device: torch.device, num_bytes: int, repeats: int) -> dict[str, float]:
    """One plain copy each way between a pinned host buffer and the GPU, and both at once."""
    is_cuda = device.type == "cuda"
    host_out = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=is_cuda)
    host_in = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=is_cuda)
    gpu_out = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    gpu_in = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    streams = [torch.cuda.Stream(device) for _ in range(2)] if is_cuda else [None, None]

    def timed(pairs) -> float:
        sync(device)
        start = time.perf_counter()
        for (dst, src), stream in zip(pairs, streams, strict=False):
            if stream is None:
                dst.copy_(src)
            else:
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
        sync(device)
        return time.perf_counter() - start

    d2h = best_of(repeats, lambda: timed([(host_out, gpu_out)]))
    h2d = best_of(repeats, lambda: timed([(gpu_in, host_in)]))
    both = best_of(repeats, lambda: timed([(host_out, gpu_out), (gpu_in, host_in)]))
    return {
        "d2h_gbps": num_bytes / d2h / 1e9,
        "h2d_gbps": num_bytes / h2d / 1e9,
        "both_gbps": 2 * num_bytes / both / 1e9,
        "bytes": num_bytes,
    }


def measure_pinning(num_bytes: int) -> dict[str, float]:
    """Seconds to pin ``num_bytes``: torch's pinned allocator vs the storage's parallel ranges."""
    results = {}
    start = time.perf_counter()
    buffer = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    results["torch_pin_memory_s"] = time.perf_counter() - start
    del buffer
    layout = KvLayout(1, 1, 1, MIB // 4, dtype="bfloat16", kv_factor=2)  # 1 MiB blocks
    for name, threads, huge in (("storage_1_thread_s", 1, True), ("storage_8_threads_s", 8, True),
                                ("storage_8_threads_no_thp_s", 8, False)):
        start = time.perf_counter()
        host = PinnedHostStorage(layout, num_bytes // MIB, pin_threads=threads, huge_pages=huge,
                                 pin_chunk_bytes=256 * MIB)
        host.wait_ready(120)
        results[name] = time.perf_counter() - start
        host.close()
    results["bytes"] = num_bytes
    return results


# -- handlers -----------------------------------------------------------------------------------


def make_layout(kind: str, block_bytes: int, num_layers: int) -> KvLayout:
    elements = block_bytes // (2 * num_layers * 2)  # bf16, K and V
    head_dim = 128 if elements % 128 == 0 else 1
    tokens = max(1, min(32, elements // head_dim))
    while elements % (tokens * head_dim):
        tokens //= 2
    heads = elements // (tokens * head_dim)
    lk = LayoutKind.FULLY_CONTIGUOUS if kind == "fc" else LayoutKind.LAYER_SEPARATE
    layout = KvLayout(num_layers, tokens, heads, head_dim, dtype="bfloat16", kind=lk)
    assert layout.bytes_per_block == block_bytes, (layout, block_bytes)
    return layout


def make_region_pool(block_bytes: int, num_layers: int, num_blocks: int, device: torch.device, rng) -> RegionPool:
    """Two layer groups of half the layers each; group 1's pages a permutation of group 0's."""
    half = block_bytes // 2
    regions = []
    for group in range(2):
        tensor = torch.empty((num_blocks, half), dtype=torch.uint8, device=device)
        tensor.random_(0, 256)
        regions.append(PageRegion(group, group * half, half, tensor))
    pool = RegionPool(regions, block_layout(16, block_bytes), [num_blocks, num_blocks], device)
    pool.set_pages(list(range(num_blocks)), [[int(p) for p in rng.permutation(num_blocks)]])
    return pool


def make_pool(kind: str, layout: KvLayout, num_blocks: int, device: torch.device) -> DevicePool:
    inner, layers = layout.elements_per_region, layout.num_layers
    if kind == "fc":
        tensors = [torch.empty((num_blocks, layers, 2, inner), dtype=torch.bfloat16, device=device)]
    elif kind == "ls-carved":
        tensors = list(torch.empty((layers, num_blocks, 2, inner), dtype=torch.bfloat16, device=device).unbind(0))
    else:
        tensors = [torch.empty((num_blocks, 2, inner), dtype=torch.bfloat16, device=device) for _ in range(layers)]
    for t in tensors:
        t.view(torch.uint8).random_(0, 256)
    return DevicePool(tensors, layout)


class JobMaker:
    def __init__(self) -> None:
        self.next_id = 0

    def jobs(self, src: str, dst: str, src_ids: np.ndarray, dst_ids: np.ndarray, per_job: int) -> list[TransferJob]:
        out = []
        for start in range(0, src_ids.size, per_job):
            self.next_id += 1
            out.append(TransferJob(self.next_id, src, dst, tuple(src_ids[start:start + per_job].tolist()),
                                   tuple(dst_ids[start:start + per_job].tolist())))
        return out


def slot_order(num: int, per_job: int, rng: np.random.Generator, scattered: bool) -> np.ndarray:
    """Host slots: consecutive within a job, jobs in random order (or every slot random)."""
    if scattered:
        return rng.permutation(num)
    starts = rng.permutation(np.arange(0, num, per_job))
    return np.concatenate([np.arange(s, min(s + per_job, num)) for s in starts])


def timed_jobs(device, work: list[tuple[object, list[TransferJob]]], submit_every: int) -> float:
    """Seconds from the first submit until every job of every handler has been reported ok."""
    sync(device)
    ready = torch.cuda.current_stream(device).record_event() if device.type == "cuda" else None
    start = time.perf_counter()
    # at least 8 submits per handler, so that two directions overlap from the start
    step = max(1, min(submit_every, min(len(jobs) for _, jobs in work) // 8))
    per_handler = [[(h, jobs[i:i + step]) for i in range(0, len(jobs), step)] for h, jobs in work]
    # round-robin over handlers, so both directions start together
    for batches in itertools.zip_longest(*per_handler):
        for handler, batch in filter(None, batches):
            handler.submit(batch, ready)
    expected = sum(len(jobs) for _, jobs in work)
    done = 0
    while done < expected:
        for handler, _ in work:
            for result in handler.poll():
                if not result.ok:
                    raise RuntimeError(f"job {result.job_id} failed: {result.error}")
                done += 1
    return time.perf_counter() - start


def run_size(args, device, block_bytes: int, rng) -> list[Row]:
    num_blocks = max(2, (args.total_mib * MIB) // block_bytes)
    host = PinnedHostStorage(make_layout("fc", block_bytes, args.layers), 2 * num_blocks)
    host.wait_ready(300)
    rows = []
    for kind in args.layouts:
        rows.append(measure_layout(args, device, kind, host, num_blocks, rng))
        torch.cuda.empty_cache() if device.type == "cuda" else None
        print(f"  {kind:9} {block_bytes // KIB:>5} KiB done", file=sys.stderr, flush=True)
    host.close()
    return rows


def kernel_name(handler) -> str:
    pool = handler._pool  # the benchmark reports which gather/scatter path ran
    if not hasattr(pool, "blocks"):
        return "regions"
    if pool.blocks is not None:
        return "strided"
    return "triton" if pool.has_triton else "per-layer"


def measure_layout(args, device, kind: str, host: PinnedHostStorage, num_blocks: int, rng) -> Row:
    """Offload, onboard and both at once for ``num_blocks`` blocks of one pool layout."""
    block_bytes = host.layout.bytes_per_block
    if kind == "v2":
        layout = make_layout("ls", block_bytes, 2)  # two pieces: one per layer group
        pool: DevicePool | RegionPool = make_region_pool(block_bytes, args.layers, 2 * num_blocks, device, rng)
    else:
        layout = make_layout(kind, block_bytes, args.layers)
        pool = make_pool(kind, layout, 2 * num_blocks, device)
    offload = GpuToHostHandler(pool, host, staging_bytes=args.staging_mib * MIB)
    onboard = HostToGpuHandler(pool, host, staging_bytes=args.staging_mib * MIB)
    maker = JobMaker()
    per_job = args.blocks_per_job
    nbytes = num_blocks * block_bytes

    def one_way(handler, scattered: bool) -> float:
        gpu = rng.permutation(num_blocks)
        slots = slot_order(num_blocks, per_job, rng, scattered)
        src, dst = (gpu, slots) if handler is offload else (slots, gpu)
        jobs = maker.jobs(handler.src_medium, handler.dst_medium, src, dst, per_job)
        return timed_jobs(device, [(handler, jobs)], args.submit_every)

    def both_ways() -> float:
        out_jobs = maker.jobs("gpu", "cpu", rng.permutation(num_blocks),
                              slot_order(num_blocks, per_job, rng, False), per_job)
        in_jobs = maker.jobs("cpu", "gpu", num_blocks + slot_order(num_blocks, per_job, rng, False),
                             num_blocks + rng.permutation(num_blocks), per_job)
        return timed_jobs(device, [(offload, out_jobs), (onboard, in_jobs)], args.submit_every)

    for handler in (offload, onboard):  # warm-up: first-use costs (module loading) out of the way
        one_way(handler, False), one_way(handler, True)
    row = Row(
        layout=kind,
        block_bytes=block_bytes,
        piece_bytes=block_bytes // layout.num_pieces,
        num_blocks=num_blocks,
        kernel=kernel_name(offload),
        zero_copy=offload.is_zero_copy_enabled,
        offload_gbps=nbytes / best_of(args.repeats, lambda: one_way(offload, False)) / 1e9,
        onboard_gbps=nbytes / best_of(args.repeats, lambda: one_way(onboard, False)) / 1e9,
        both_gbps=2 * nbytes / best_of(args.repeats, both_ways) / 1e9,
        offload_scattered_gbps=nbytes / one_way(offload, True) / 1e9,
        onboard_scattered_gbps=nbytes / one_way(onboard, True) / 1e9,
    )
    offload.close()
    onboard.close()
    return row


# -- report -------------------------------------------------------------------------------------


def judge(rows: list[Row], ceiling: dict[str, float]) -> dict[str, object]:
    for row in rows:
        row.offload_pct = 100 * row.offload_gbps / ceiling["d2h_gbps"]
        row.onboard_pct = 100 * row.onboard_gbps / ceiling["h2d_gbps"]
        row.both_ratio = row.both_gbps / ((row.offload_gbps + row.onboard_gbps) / 2)
    big = [r for r in rows if r.layout == "fc" and r.block_bytes >= MIB]
    small = [r for r in rows if r.layout != "fc" and r.piece_bytes == 128 * KIB]
    return {
        "fc_blocks_ge_1MiB_ge_95pct": bool(big) and all(min(r.offload_pct, r.onboard_pct) >= 95 for r in big),
        "pieces_128KiB_ge_80pct": bool(small) and all(min(r.offload_pct, r.onboard_pct) >= 80 for r in small),
        "both_directions_ge_1_5x": all(r.both_ratio >= 1.5 for r in rows if r.block_bytes >= MIB),
    }


def print_table(rows: list[Row], ceiling: dict[str, float]) -> None:
    print(f"ceiling (one plain copy of {ceiling['bytes'] / GIB:.2f} GiB): GPU->host "
          f"{ceiling['d2h_gbps']:.1f} GB/s, host->GPU {ceiling['h2d_gbps']:.1f} GB/s, "
          f"both at once {ceiling['both_gbps']:.1f} GB/s")
    header = ("layout", "block", "piece", "kernels", "offload GB/s", "%", "onboard GB/s", "%",
              "both GB/s", "x", "scattered off/on")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([
            r.layout, f"{r.block_bytes // KIB} KiB", f"{r.piece_bytes // KIB} KiB",
            r.kernel + ("+zc" if r.zero_copy else ""),
            f"{r.offload_gbps:.1f}", f"{r.offload_pct:.0f}", f"{r.onboard_gbps:.1f}", f"{r.onboard_pct:.0f}",
            f"{r.both_gbps:.1f}", f"{r.both_ratio:.2f}",
            f"{r.offload_scattered_gbps:.1f} / {r.onboard_scattered_gbps:.1f}",
        ]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="small sizes; runs on the CPU too")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--sizes", default="128K,512K,1M,2M,4M,8M")
    parser.add_argument("--layouts", default="fc,ls,ls-carved", help="fc, ls, ls-carved, v2")
    parser.add_argument("--layout", default=None, help="one layout only (e.g. v2); overrides --layouts")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--total-mib", type=int, default=2048, help="bytes moved per measurement")
    parser.add_argument("--blocks-per-job", type=int, default=128)
    parser.add_argument("--submit-every", type=int, default=8, help="jobs per submit() call")
    parser.add_argument("--staging-mib", type=int, default=DEFAULT_STAGING_BYTES >> 20)
    parser.add_argument("--ceiling-mib", type=int, default=2048)
    parser.add_argument("--pin-gib", type=float, default=4.0, help="0 skips the pinning timings")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        args.sizes, args.layers, args.total_mib, args.ceiling_mib = "128K,1M", 8, 32, 64
        args.repeats, args.pin_gib, args.blocks_per_job = 1, 0.0, 16
    args.layouts = [args.layout] if args.layout else args.layouts.split(",")
    rng = np.random.default_rng(0)
    ceiling = measure_ceiling(device, args.ceiling_mib * MIB, args.repeats)
    pinning = measure_pinning(int(args.pin_gib * GIB)) if device.type == "cuda" and args.pin_gib else {}
    rows = []
    for size in args.sizes.split(","):
        rows.extend(run_size(args, device, parse_size(size), rng))
    targets = judge(rows, ceiling)
    print_table(rows, ceiling)
    if pinning:
        print("pinning {:.1f} GiB: ".format(pinning["bytes"] / GIB) + ", ".join(
            f"{k} {v:.2f}" for k, v in pinning.items() if k != "bytes"))
    print("targets:", json.dumps(targets))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "ceiling": ceiling,
        "pinning": pinning,
        "rows": [asdict(r) for r in rows],
        "targets": targets,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
