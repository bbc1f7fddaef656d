"""``kvbm bench``: one workload through the reference executor, without kvbm and with it.

Which process: the ``kvbm`` command (or a test); TP>1 runs one spawned process per rank.

``run_bench(options, ...) -> BenchReport`` is the whole bench: resolve and check the options,
build the workload, run it without kvbm (unless ``baseline`` is off) and with it, and compare:
the per-round TTFT table, hit rates per tier, bytes moved and transfer rates, and whether the
outputs are identical (they must be: loaded KV is bit-identical to recomputed KV);
``write_report`` saves ``bench.json`` and ``bench.png``. Each step is a module of its own, and
their names are importable from here too:
- :mod:`~kvbm_trtllm.bench_options`: ``BenchOptions``, ``resolve()``, ``BenchError``.
- :mod:`~kvbm_trtllm.bench_checks`: the options against this machine, before any run.
- :mod:`~kvbm_trtllm.bench_workload`: ``build_workload``, ``size_pools``.
- :mod:`~kvbm_trtllm.bench_run`: ``run_once`` (one executor run), ``kvbm_settings``,
  ``warm_up``; :mod:`~kvbm_trtllm.bench_tp` for TP>1; :mod:`~kvbm_trtllm.bench_outcome` for
  what a run measured.
- :mod:`~kvbm_trtllm.bench_probe`: ``probe_transfers`` (rates per direction, idle engine).
- :mod:`~kvbm_trtllm.bench_report`: ``BenchReport``, ``round_rows``, ``format_report``,
  ``write_report``; :mod:`~kvbm_trtllm.bench_plot`: ``plot_rounds``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from kvbm_trtllm.bench_checks import check_before_runs, check_tiers
from kvbm_trtllm.bench_options import (
    MODEL_PRESETS,
    WORKLOADS,
    BenchError,
    BenchOptions,
    ResolvedBenchOptions,
)
from kvbm_trtllm.bench_outcome import RunOutcome
from kvbm_trtllm.bench_report import (
    BenchReport,
    format_report,
    round_rows,
    write_report,
)
from kvbm_trtllm.bench_run import kvbm_settings, run_once, warm_up
from kvbm_trtllm.bench_workload import build_workload, size_pools

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
