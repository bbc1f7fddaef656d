"""G2 start-up benchmark: how soon the host tier serves, against its size, while it pins.

Pinning (``cudaHostRegister``) takes about 0.45 s per GiB on an H200 host: 27 s for 60 GB,
7.5 min for 1 TB. The tier pins range by range and serves from the ranges already pinned, so
its first usable slot comes after one range, not after all of them. For each tier size this
submits one offload job to slot 0 through the real ``GpuToHostHandler`` the moment the storage
exists and reports:

- ``first_usable_s``: until that job completed (what a request's store waits);
- ``all_pinned_s``: until every range was pinned (what every job waited before ranges served;
  simulated: projected from the range time (the first range pins alone), ``all_pinned_measured``
  false, unless ``--full``);
- ``first_range_s``: the storage's own ``first_ready_s``.

Modes:
- simulated (default; CPU is enough): each range is a small real buffer whose pinning sleeps
  as long as pinning ``--range-gib`` would take at ``--secs-per-gib`` (``--driver serial``: one
  registration at a time, the measured 27 s for 60 GB; ``parallel``: all threads at once); once the first job is
  done the storage is closed (pinning stops), so a 4 TiB tier costs a second, not 8 minutes.
- ``--real`` (GPU): real host memory, really pinned, tier sizes from ``--real-gib``; mind the
  host's RAM (the lead's H200 box: 128 GiB).

    python benchmarks/bench_pinning.py --out pinning.json                 # CPU, simulated
    python benchmarks/bench_pinning.py --real --real-gib 4,16,48 --out pinning-gpu.json

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch

from kvbm_core import DevicePool, KvLayout, TransferJob
from kvbm_tiers_cpu import GpuToHostHandler, PinnedHostStorage

GIB = 1 << 30


@dataclass
class Row:
    tier_gib: float
    num_ranges: int
    pin_threads: int
    first_usable_s: float
    first_range_s: float
    all_pinned_s: float
    all_pinned_measured: bool
    mode: str


class SimulatedPinning(PinnedHostStorage):
    """Pinning each (small) range sleeps as long as pinning a full range would take."""

    range_sleep_s = 0.0
    driver_lock: threading.Lock | None = None  # "serial": the driver registers one at a time

    def _pin_range(self, ptr: int, size: int) -> None:
        with self.driver_lock or contextlib.nullcontext():
            time.sleep(self.range_sleep_s)

    def _unpin_range(self, ptr: int) -> None:
        pass


def _layout(block_bytes: int) -> KvLayout:
    return KvLayout(1, 1, 1, block_bytes // 4, dtype="bfloat16", kv_factor=2)


def _pool(layout: KvLayout, device: torch.device) -> DevicePool:
    tensor = torch.ones((8, 1, 2, layout.elements_per_region), dtype=torch.bfloat16, device=device)
    return DevicePool([tensor], layout)


def _first_job_s(host: PinnedHostStorage, pool: DevicePool, started: float, timeout_s: float) -> float:
    """Seconds from ``started`` until an offload to slot 0, submitted now, completed."""
    handler = GpuToHostHandler(pool, host, staging_bytes=8 * pool.layout.bytes_per_block, zero_copy=False)
    handler.submit([TransferJob(1, "gpu", "cpu", (0,), (0,))])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        results = handler.poll()
        if results:
            if not results[0].ok:
                raise RuntimeError(f"the first job failed: {results[0].error}")
            handler.close()
            return time.perf_counter() - started
        time.sleep(0.0005)
    raise RuntimeError(f"the first job did not complete within {timeout_s:.0f} s")


def measure(tier_gib: float, args: argparse.Namespace, device: torch.device) -> Row:
    if args.real:
        layout = _layout(args.block_kib << 10)
        num_slots = int(tier_gib * GIB) // layout.bytes_per_block
        chunk, storage_type, mode = int(args.range_gib * GIB), PinnedHostStorage, "real"
    else:
        layout = _layout(4096)
        num_ranges = max(1, round(tier_gib / args.range_gib))
        num_slots, chunk, mode = num_ranges, 4096, "simulated"
        storage_type = SimulatedPinning
        SimulatedPinning.range_sleep_s = args.range_gib * args.secs_per_gib
        SimulatedPinning.driver_lock = threading.Lock() if args.driver == "serial" else None
    pool = _pool(layout, device)
    started = time.perf_counter()
    host = storage_type(layout, num_slots, pin=True, pin_threads=args.pin_threads, pin_chunk_bytes=chunk,
                        huge_pages=args.real and not args.no_huge_pages, init_timeout_s=args.timeout_s)  # fmt: skip
    first_usable = _first_job_s(host, pool, started, args.timeout_s)
    is_measured = args.real or args.full
    if is_measured:
        host.wait_ready(args.timeout_s)
        all_pinned = time.perf_counter() - started
    else:
        in_parallel = 1 if args.driver == "serial" else args.pin_threads
        all_pinned = (1 + -(-(len(host.pin_ranges) - 1) // in_parallel)) * SimulatedPinning.range_sleep_s
    row = Row(tier_gib, len(host.pin_ranges), args.pin_threads, first_usable,
              host.first_ready_s or 0.0, all_pinned, is_measured, mode)  # fmt: skip
    host.close()
    return row


def print_table(rows: list[Row]) -> None:
    print(f"{'tier GiB':>9} {'ranges':>7} {'threads':>7} {'first usable s':>15} {'first range s':>14} {'all pinned s':>13}")
    for r in rows:
        mark = "" if r.all_pinned_measured else " (projected)"
        print(f"{r.tier_gib:>9g} {r.num_ranges:>7d} {r.pin_threads:>7d} {r.first_usable_s:>15.3f} "
              f"{r.first_range_s:>14.3f} {r.all_pinned_s:>13.1f}{mark}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="really pin host memory (needs a GPU)")
    parser.add_argument("--sizes-gib", default="1,8,60,256,1024,4096", help="simulated tier sizes")
    parser.add_argument("--real-gib", default="4,16,48", help="tier sizes with --real")
    parser.add_argument("--range-gib", type=float, default=1.0, help="bytes per pinned range (cpu_pin_chunk_mib)")
    parser.add_argument("--secs-per-gib", type=float, default=0.45, help="simulated pin time (H200 host)")
    parser.add_argument("--driver", choices=("serial", "parallel"), default="serial",
                        help="simulated: registrations one at a time (0.45 s/GiB overall, as measured "
                        "with 8 threads) or truly in parallel")
    parser.add_argument("--full", action="store_true", help="simulated: wait for every range too")
    parser.add_argument("--pin-threads", type=int, default=8)
    parser.add_argument("--block-kib", type=int, default=1024, help="block bytes with --real")
    parser.add_argument("--no-huge-pages", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.real and not torch.cuda.is_available():
        parser.error("--real pins host memory for a GPU: run it on a machine with CUDA")
    device = torch.device("cuda" if args.real else "cpu")
    sizes = [float(s) for s in (args.real_gib if args.real else args.sizes_gib).split(",")]
    rows = [measure(size, args, device) for size in sizes]
    print_table(rows)
    if args.out:
        report = {"machine": platform.node(), "python": sys.version.split()[0], "args": vars(args),
                  "rows": [asdict(r) for r in rows]}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
