"""Disk tier (G3) throughput: kvbm's handlers against plain sequential I/O on the same disk.

Measured in one run, on one file system:
- ``seq write``: dd-like: one file written front to back in block-sized buffered writes, then
  fsync; ``seq read``: the same file read front to back with O_DIRECT (or after dropping it
  from the page cache where O_DIRECT is refused).
- ``rand write`` / ``rand read``: the same shuffled block offsets with ``--threads`` threads and
  O_DIRECT but no kvbm: the device's own ceiling for the access pattern the tier sees.
- ``cpu->disk`` / ``disk->cpu``: the disk tier's host handlers moving ``--blocks`` blocks in
  jobs of ``--blocks-per-job`` to shuffled slots (headers, checksums and verification
  included); writes end with an fdatasync, reads start with the file out of the page cache.
  ``--backend nixl`` (or ``both``) runs them on the NIXL handlers too (rows marked
  ``(nixl)``; needs a NIXL wheel, e.g. nixl-cu13, whose POSIX backend needs no GPU).
- ``gpu->disk`` / ``disk->gpu``: the GPU handlers (through the bounce buffer), with a CUDA
  pool when a GPU is present and a CPU tensor standing in for it otherwise.

Prints a table and writes JSON (``--out``). Needs only kvbm-core, kvbm-tiers-disk, numpy,
xxhash, pluggy and torch::

    PYTHONPATH=packages/kvbm-core/src:packages/kvbm-tiers-disk/src \\
        python benchmarks/bench_disk_tier.py --out disk.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kvbm_core.layout import KvLayout, LayoutKind
from kvbm_core.transfer import DevicePool, TransferJob
from kvbm_tiers_disk.handlers import (
    DiskToGpuHandler,
    DiskToHostHandler,
    GpuToDiskHandler,
    HostToDiskHandler,
)
from kvbm_tiers_disk.storage import DiskStorage

BYTES_PER_LAYER = 2 * 8 * 32 * 128 * 2  # K,V x 8 heads x 32 tokens x 128 head_dim, bf16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "kvbm-bench-disk"))
    parser.add_argument("--block-mib", type=float, default=4.0, help="block size (MiB)")
    parser.add_argument("--blocks", type=int, default=256, help="blocks per direction")
    parser.add_argument("--blocks-per-job", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16, help="I/O threads per handler")
    parser.add_argument("--io-depth", type=int, default=None, help="syscalls in flight (all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--slot-order",
        choices=["shuffled", "sequential"],
        default="shuffled",
        help="tier slots used",
    )
    parser.add_argument(
        "--backend",
        choices=["threads", "nixl", "both"],
        default="threads",
        help="host<->disk handlers to measure",
    )
    parser.add_argument("--no-o-direct", action="store_true", help="buffered I/O in the tier")
    parser.add_argument("--layer-separate", action="store_true", help="GPU pool per layer")
    parser.add_argument("--no-gpu-pool", action="store_true", help="skip gpu<->disk")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def bench_layout(args: argparse.Namespace) -> KvLayout:
    num_layers = max(1, round(args.block_mib * 2**20 / BYTES_PER_LAYER))
    kind = LayoutKind.LAYER_SEPARATE if args.layer_separate else LayoutKind.FULLY_CONTIGUOUS
    return KvLayout(num_layers, 32, 8, 128, "bfloat16", kind=kind)


def aligned(num_bytes: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, num_bytes), dtype=np.uint8)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential(path: Path, block: np.ndarray, num_blocks: int) -> tuple[float, float, str]:
    """Seconds to write (+fsync) and read ``num_blocks`` blocks front to back; read mode."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(num_blocks):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    write_s = time.perf_counter() - start
    drop_cache(path)
    try:
        fd, mode = os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
    except OSError:
        fd, mode = os.open(path, os.O_RDONLY), "page cache dropped"
    buffer = aligned(block.nbytes)
    start = time.perf_counter()
    for i in range(num_blocks):
        os.preadv(fd, [buffer], i * block.nbytes)
    read_s = time.perf_counter() - start
    os.close(fd)
    path.unlink()
    return write_s, read_s, mode


def raw_random(
    path: Path, block: np.ndarray, slots: list[int], threads: int
) -> tuple[float, float]:
    """Seconds to write (+fsync) and read the same shuffled 4 KiB-aligned block offsets with
    ``threads`` threads and O_DIRECT, without kvbm: the device's ceiling for that pattern."""
    size = block.nbytes
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.posix_fallocate(fd, 0, size * len(slots))
    os.close(fd)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        fd = os.open(path, os.O_RDWR)
    local = threading.local()

    def one(slot: int, write: bool) -> None:
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = aligned(size)
            buffer[:] = block
        (os.pwritev if write else os.preadv)(fd, [buffer], slot * size)

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(one, slots, [True] * len(slots)))
        os.fdatasync(fd)
        write_s = time.perf_counter() - start
        drop_cache(path)
        start = time.perf_counter()
        list(pool.map(one, slots, [False] * len(slots)))
        read_s = time.perf_counter() - start
    os.close(fd)
    path.unlink()
    return write_s, read_s


def timed_jobs(handler, jobs: list[TransferJob], after: Callable[[], None] = lambda: None) -> float:
    start = time.perf_counter()
    handler.submit(jobs)
    results = handler.wait()
    after()
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    if failed or len(results) != len(jobs):
        raise SystemExit(f"{handler.src_medium}->{handler.dst_medium}: {failed[:1]}")
    return elapsed


def make_jobs(src: str, dst: str, src_ids, dst_ids, hashes, per_job: int) -> list[TransferJob]:
    jobs = []
    for start in range(0, len(src_ids), per_job):
        part = slice(start, start + per_job)
        jobs.append(
            TransferJob(
                len(jobs), src, dst, tuple(src_ids[part]), tuple(dst_ids[part]), tuple(hashes[part])
            )
        )
    return jobs


def _suffix(backend: str) -> str:
    return "" if backend == "threads" else f" ({backend})"


def host_handlers(backend: str, host: np.ndarray, storage: DiskStorage, threads: int) -> tuple:
    if backend == "threads":
        return HostToDiskHandler(host, storage, threads), DiskToHostHandler(host, storage, threads)
    from kvbm_tiers_disk.nixl_handlers import NixlDiskToHostHandler, NixlHostToDiskHandler

    return NixlHostToDiskHandler(host, storage, threads), NixlDiskToHostHandler(
        host, storage, threads
    )


def make_pool(layout: KvLayout, num_blocks: int, device: str) -> DevicePool:
    import torch

    shape = (num_blocks, layout.kv_factor, layout.elements_per_region)
    if layout.kind is LayoutKind.FULLY_CONTIGUOUS:
        tensors = [
            torch.randn(
                (num_blocks, layout.num_layers, *shape[1:]), device=device, dtype=torch.bfloat16
            )
        ]
    else:
        tensors = [
            torch.randn(shape, device=device, dtype=torch.bfloat16)
            for _ in range(layout.num_layers)
        ]
    return DevicePool(tensors, layout)


def run(args: argparse.Namespace) -> dict:
    layout = bench_layout(args)
    bpb = layout.bytes_per_block
    n = args.blocks
    total = bpb * n
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    host = aligned(total).reshape(n, bpb)
    host[:] = rng.integers(0, 256, bpb, dtype=np.uint8)  # one random block, made unique below
    host[:, :8] = np.arange(n, dtype=np.uint64).view(np.uint8).reshape(n, 8)
    original = host.copy()
    hashes = [0x9E3779B97F4A7C15 * (i + 1) % 2**64 for i in range(n)]
    slots = rng.permutation(n).tolist() if args.slot_order == "shuffled" else list(range(n))
    backends = ["threads", "nixl"] if args.backend == "both" else [args.backend]
    names = ["seq write", "seq read", "rand write", "rand read"]
    for backend in backends:
        names += [f"cpu->disk{_suffix(backend)}", f"disk->cpu{_suffix(backend)}"]
    rows: dict[str, list[float]] = {k: [] for k in names}
    seq_mode = ""
    for _ in range(args.repeats):
        write_s, read_s, seq_mode = sequential(directory / "sequential.bin", host[0], n)
        rows["seq write"].append(total / write_s)
        rows["seq read"].append(total / read_s)
        write_s, read_s = raw_random(directory / "random.bin", host[0], slots, args.threads)
        rows["rand write"].append(total / write_s)
        rows["rand read"].append(total / read_s)

    storage = DiskStorage(
        layout,
        n,
        directory,
        use_o_direct=not args.no_o_direct,
        index_flush_secs=3600,
        io_depth=args.io_depth,
    )
    sync = storage.sync  # what the dd-like baseline's fsync pays for
    to_disk = make_jobs("cpu", "disk", list(range(n)), slots, hashes, args.blocks_per_job)
    from_disk = make_jobs("disk", "cpu", slots, list(range(n))[::-1], hashes, args.blocks_per_job)
    for backend in backends:
        up, down = host_handlers(backend, host, storage, args.threads)
        suffix = _suffix(backend)
        for _ in range(args.repeats):
            rows[f"cpu->disk{suffix}"].append(total / timed_jobs(up, to_disk, sync))
            host[:] = 0
            drop_cache(storage.path)
            rows[f"disk->cpu{suffix}"].append(total / timed_jobs(down, from_disk))
            if not np.array_equal(host[::-1], original):
                raise SystemExit(f"disk->cpu ({backend}) returned different bytes")
            host[:] = original
        up.close()
        down.close()

    device = None
    if not args.no_gpu_pool:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pool = make_pool(layout, n, device)
        rows["gpu->disk"], rows["disk->gpu"] = [], []
        g_up = GpuToDiskHandler(pool, storage, args.threads)
        g_down = DiskToGpuHandler(pool, storage, args.threads)
        g_to = make_jobs("gpu", "disk", list(range(n)), slots, hashes, args.blocks_per_job)
        g_from = make_jobs("disk", "gpu", slots, list(range(n)), hashes, args.blocks_per_job)
        for _ in range(args.repeats):
            rows["gpu->disk"].append(total / timed_jobs(g_up, g_to, sync))
            drop_cache(storage.path)
            rows["disk->gpu"].append(total / timed_jobs(g_down, g_from))
        g_up.close()
        g_down.close()
    stats = storage.stats
    storage.close()
    storage.path.unlink()
    storage.index_path.unlink(missing_ok=True)

    medians = {k: statistics.median(v) / 1e9 for k, v in rows.items()}
    return {
        "machine": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "device": device,
        "dir": str(directory),
        "block_bytes": bpb,
        "blocks": n,
        "blocks_per_job": args.blocks_per_job,
        "threads": args.threads,
        "backends": backends,
        "io_depth": args.io_depth,
        "slot_order": args.slot_order,
        "repeats": args.repeats,
        "layout": layout.kind.value,
        "tier_o_direct": storage.is_o_direct,
        "sequential_read_mode": seq_mode,
        "gb_per_s": medians,
        "runs_gb_per_s": {k: [x / 1e9 for x in v] for k, v in rows.items()},
        "vs_sequential": {
            k: medians[k] / medians["seq write" if "->disk" in k else "seq read"]
            for k in medians
            if "->" in k
        },
        "vs_raw_random": {
            k: medians[k] / medians["rand write" if "->disk" in k else "rand read"]
            for k in medians
            if "->" in k
        },
        "stats": stats,
    }


def print_table(result: dict) -> None:
    print(
        f"disk tier on {result['machine']} ({result['cpus']} cpus), {result['blocks']} x "
        f"{result['block_bytes'] / 2**20:g} MiB blocks, {result['threads']} threads (or NIXL "
        f"staging slots) per handler, tier "
        f"O_DIRECT={result['tier_o_direct']}, gpu pool on {result['device']}, median of "
        f"{result['repeats']}"
    )
    print(f"{'path':<18} {'GB/s':>7} {'vs sequential':>14} {'vs raw random':>14}")
    for name, value in result["gb_per_s"].items():
        ratios = [result[key].get(name) for key in ("vs_sequential", "vs_raw_random")]
        shown = [f"{r:.0%}" if r is not None else "" for r in ratios]
        print(f"{name:<18} {value:>7.2f} {shown[0]:>14} {shown[1]:>14}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
