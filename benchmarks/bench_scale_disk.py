"""Disk tier (G3) index at scale: memory per block, restart time, flush and compaction cost.

For each size N (10^4, 10^5, 10^6; 10^7 with ``--max 10000000``) one rank's disk tier of N
slots is filled with N index entries (``PersistentIndex.add``, the path a completed write
takes), then measured:
- ``B/block``: memory the worker keeps for the index after a restart (tracemalloc across
  ``DiskStorage(...)``: the slot table, the start-up block map and anything else allocated),
  and ``arrays``: the bytes of those arrays alone.
- ``compact s``: one compaction (snapshot of N entries written, fsynced, renamed; an empty
  journal started): the first flush after filling.
- ``store ms``: the flush that makes one stored block durable (a real 4 KiB block written,
  then fdatasync of the slots file, one journal batch appended, fdatasync); median of 20.
- ``1k ms``: the same flush carrying 1000 stores (one second of heavy traffic).
- ``restart s``: open until usable: ``DiskStorage(...)`` (read the snapshot, replay a journal
  of 100 batches x 100 records, build the slot table and the block map) then
  ``persisted_blocks()``; with the index files dropped from the page cache (``cold``) and
  not (``warm``). The slots' headers are not read (the default: every load verifies its
  slot). ``encode s``: what the worker then does with it: the ``StoredBlocks`` message of
  kvbm-discovery encoded for the leader (reported, not part of the index).

The slots file is sparse (only the 4 KiB blocks the flush measurements write take space), so
N = 10^7 needs ~0.5 GB of disk for the index files, not 80 GB. Prints a table and writes
JSON (``--out``)::

    uv run python benchmarks/bench_scale_disk.py --max 10000000 --out scale.json
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kvbm_core.layout import KvLayout
from kvbm_tiers_disk import slots_file
from kvbm_tiers_disk.storage import DiskStorage

# 2 layers x K,V x (4 heads x 16 tokens x 8) fp16 = 4 KiB blocks: a slot is 8 KiB.
LAYOUT = KvLayout(num_layers=2, tokens_per_block=16, num_kv_heads=4, head_dim=8, dtype="float16")
SIZES = (10_000, 100_000, 1_000_000, 10_000_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "kvbm-bench-scale"))
    parser.add_argument("--max", type=int, default=1_000_000, help="largest N (up to 10^7)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


@contextmanager
def sparse_slots_file() -> Iterator[None]:
    """Let the tier's slots file stay sparse: the benchmark measures the index, and
    preallocating N slots of 8 KiB would need 80 GB at N = 10^7."""

    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "sparse for the benchmark")

    saved = os.posix_fallocate, slots_file._free_bytes
    os.posix_fallocate = refuse
    slots_file._free_bytes = lambda directory: 1 << 60
    try:
        yield
    finally:
        os.posix_fallocate, slots_file._free_bytes = saved


def open_tier(directory: Path, num_slots: int) -> DiskStorage:
    return DiskStorage(LAYOUT, num_slots, directory, index_flush_secs=3600)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fill(disk: DiskStorage, n: int, rng: np.random.Generator) -> None:
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64).tolist()
    checksums = rng.integers(0, 2**63, n, dtype=np.uint64).tolist()
    add = disk.index.add
    for slot, (block_hash, checksum) in enumerate(zip(hashes, checksums, strict=True)):
        add(slot, block_hash, checksum)


def flush_costs(disk: DiskStorage, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Median seconds of a flush carrying one real store, and of one carrying 1000."""
    block = rng.integers(0, 256, LAYOUT.bytes_per_block, dtype=np.uint8)
    one = []
    for slot in rng.choice(n, 20, replace=False).tolist():
        disk.write_block(slot, int(rng.integers(0, 2**63)), block)
        one.append(timed(disk.flush_index)[0])
    many = []
    for _ in range(5):
        for slot in rng.choice(n, 1000, replace=False).tolist():
            disk.index.add(slot, int(rng.integers(0, 2**63)), 1)
        many.append(timed(disk.flush_index)[0])
    return statistics.median(one), statistics.median(many)


def grow_journal(disk: DiskStorage, n: int, rng: np.random.Generator) -> None:
    """100 flushes of 100 stores each, left in the journal for the restart to replay."""
    for _ in range(100):
        for slot in rng.choice(n, 100, replace=False).tolist():
            disk.index.add(slot, int(rng.integers(0, 2**63)), 1)
        disk.flush_index()


def restart(directory: Path, n: int, *, cold: bool) -> tuple[float, DiskStorage]:
    disk_files = [directory / "kvbm-disk-rank0.index", directory / "kvbm-disk-rank0.journal"]
    if cold:
        drop_from_page_cache(disk_files)
    gc.collect()

    def open_usable() -> DiskStorage:
        disk = open_tier(directory, n)
        disk.persisted_blocks()
        return disk

    seconds, disk = timed(open_usable)
    assert isinstance(disk, DiskStorage)
    return seconds, disk


def memory_after_restart(directory: Path, n: int) -> tuple[float, float, int]:
    """(traced bytes per block, index array bytes per block, blocks found)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    disk = open_tier(directory, n)
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    try:
        return traced / n, disk.index.nbytes / n, len(disk.persisted_blocks())
    finally:
        disk.close()


def encode_seconds(disk: DiskStorage) -> float | None:
    try:
        from kvbm_discovery.messages import StoredBlocks, encode
    except ImportError:
        return None
    return timed(lambda: encode(StoredBlocks(0, "disk", disk.persisted_blocks())))[0]


def measure(root: Path, n: int) -> dict[str, float | int | None]:
    directory = root / f"n{n}"
    shutil.rmtree(directory, ignore_errors=True)
    rng = np.random.default_rng(n)
    disk = open_tier(directory, n)
    fill_s, _ = timed(lambda: fill(disk, n, rng))
    compact_s, _ = timed(disk.flush_index)
    store_s, many_s = flush_costs(disk, n, rng)
    grow_journal(disk, n, rng)
    expected = disk.stored_blocks()
    disk.close()
    index_bytes = sum(p.stat().st_size for p in directory.glob("kvbm-disk-rank0.[ij]*"))
    cold_s, disk = restart(directory, n, cold=True)
    assert disk.persisted_blocks() == expected, "the restart lost or invented blocks"
    encode_s = encode_seconds(disk)
    disk.close()
    warm_s, disk = restart(directory, n, cold=False)
    disk.close()
    traced, arrays, found = memory_after_restart(directory, n)
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "blocks": n,
        "blocks_found": found,
        "fill_s": fill_s,
        "bytes_per_block": traced,
        "array_bytes_per_block": arrays,
        "index_file_bytes": index_bytes,
        "compaction_s": compact_s,
        "store_flush_ms": store_s * 1e3,
        "flush_1000_stores_ms": many_s * 1e3,
        "restart_cold_s": cold_s,
        "restart_warm_s": warm_s,
        "stored_blocks_encode_s": encode_s,
    }


def growth(rows: list[dict], key: str) -> list[float | None]:
    ratios: list[float | None] = [None]
    for smaller, larger in zip(rows, rows[1:], strict=False):
        ratios.append(larger[key] / smaller[key] if smaller[key] else None)
    return ratios


def print_table(result: dict) -> None:
    print(
        f"disk index at scale on {result['machine']} ({result['cpus']} cpus), "
        f"{result['block_bytes']} B blocks, journal of 100 x 100 records at restart"
    )
    head = (
        f"{'N':>10} {'B/block':>8} {'arrays':>7} {'compact s':>10} {'store ms':>9} "
        f"{'1k ms':>7} {'restart cold s':>15} {'warm s':>7} {'x restart':>10} {'encode s':>9}"
    )
    print(head)
    rows = result["sizes"]
    for row, ratio in zip(rows, growth(rows, "restart_cold_s"), strict=True):
        encode = row["stored_blocks_encode_s"]
        print(
            f"{row['blocks']:>10} {row['bytes_per_block']:>8.1f} "
            f"{row['array_bytes_per_block']:>7.1f} {row['compaction_s']:>10.3f} "
            f"{row['store_flush_ms']:>9.2f} {row['flush_1000_stores_ms']:>7.2f} "
            f"{row['restart_cold_s']:>15.3f} {row['restart_warm_s']:>7.3f} "
            f"{'' if ratio is None else f'{ratio:.1f}':>10} "
            f"{'' if encode is None else f'{encode:.2f}':>9}"
        )


def run(args: argparse.Namespace) -> dict:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [n for n in SIZES if n <= args.max]
    rows = []
    with sparse_slots_file():
        for n in sizes:
            rows.append(measure(root, n))
            print(f"  measured N={n}", flush=True)
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "block_bytes": LAYOUT.bytes_per_block,
        "sizes": rows,
        "restart_growth": growth(rows, "restart_cold_s"),
        "bytes_per_block_growth": growth(rows, "bytes_per_block"),
        "compaction_growth": growth(rows, "compaction_s"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
