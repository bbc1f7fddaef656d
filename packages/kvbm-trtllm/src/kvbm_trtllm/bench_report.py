"""``kvbm bench``'s report: the per-round TTFT table, where tokens came from, bytes moved and
transfer rates, as text (``format_report``) and as ``bench.json`` (``BenchReport.to_json``).

Which process: the ``kvbm`` command (or a test). Operations:
- ``round_rows(workload, round_of, with_kvbm, without_kvbm) -> [RoundRow]``: mean TTFT and
  hits per round of the two runs.
- ``BenchReport``: both runs and their rows; ``tier_tokens()``, ``transfers()``,
  ``mean_speedup`` and ``to_json()`` (the ``kvbm_bench: 1`` document).
- ``format_report(report)``: the text the command prints.
- ``write_report(report, output_dir)``: ``bench.json`` and ``bench.png``
  (:mod:`kvbm_trtllm.bench_plot`); the paths written.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvbm_trtllm.bench_options import ResolvedBenchOptions
from kvbm_trtllm.bench_outcome import RunOutcome
from kvbm_trtllm.bench_plot import plot_rounds

__all__ = ["RoundRow", "BenchReport", "round_rows", "format_report", "write_report"]


@dataclass
class RoundRow:
    round: int
    num_requests: int
    num_prompt_tokens: int
    ttft_without_s: float | None
    ttft_with_s: float
    kvbm_hit_tokens: int
    device_hit_tokens: int

    @property
    def speedup(self) -> float | None:
        if self.ttft_without_s is None or self.ttft_with_s <= 0:
            return None
        return self.ttft_without_s / self.ttft_with_s


@dataclass
class BenchReport:
    options: ResolvedBenchOptions
    pools: dict[str, int]
    rounds: list[RoundRow]
    with_kvbm: RunOutcome
    without_kvbm: RunOutcome | None
    outputs_match: bool | None
    files: dict[str, str] = field(default_factory=dict)

    # -- what the kvbm run moved and where its hits came from --
    def tier_tokens(self) -> dict[str, int]:
        r = self.with_kvbm.result
        stats = self.with_kvbm.stats or {}
        t = self.options.tokens_per_block
        host = int(stats.get("onboard_blocks_h2d", 0)) * t
        disk = int(stats.get("onboard_blocks_d2d", 0)) * t
        return {
            "gpu": r.num_device_hit_tokens,
            "host": host,
            "disk": disk,
            "computed": r.num_computed_prompt_tokens,
            "prompt": r.num_prompt_tokens,
            "kvbm_reported": r.num_connector_hit_tokens,
        }

    def transfers(self) -> dict[str, Any]:
        stats = self.with_kvbm.stats or {}
        lat = self.with_kvbm.latencies or {}
        jobs = {}
        for kind in ("offload", "onboard"):
            hist = lat.get(f"{kind}_latency_seconds", {})
            count = hist.get("count", 0)
            jobs[kind] = {"jobs": count, "mean_latency_s": hist.get("sum_s", 0.0) / count if count else 0.0}
        moved = {name: stats.get(name, 0) for name in (
            "offload_bytes_d2h", "offload_bytes_h2d", "offload_bytes_d2d", "onboard_bytes_h2d",
            "onboard_bytes_d2d")}
        return {"bytes": moved, "jobs": jobs, "probe": self.with_kvbm.transfer_rates or {}}

    @property
    def mean_speedup(self) -> float | None:
        """Mean TTFT without kvbm over mean TTFT with it, rounds after the first."""
        later = [r for r in self.rounds if r.round > 0]
        if self.without_kvbm is None or not later:
            return None
        without = statistics.fmean(r.ttft_without_s for r in later if r.ttft_without_s is not None)
        with_ = statistics.fmean(r.ttft_with_s for r in later)
        return without / with_ if with_ > 0 else None

    def to_json(self) -> dict[str, Any]:
        def run_json(outcome: RunOutcome | None) -> dict[str, Any] | None:
            if outcome is None:
                return None
            r = outcome.result
            return {
                "wall_s": outcome.wall_s,
                "summary": r.summary(),
                "requests": [
                    {"request_id": q.request_id, "prompt_len": q.prompt_len, "ttft_s": q.ttft_s,
                     "device_hit_tokens": q.num_device_hit_tokens,
                     "kvbm_hit_tokens": q.num_connector_hit_tokens}
                    for q in r.requests.values()
                ],
                "kvbm_stats": outcome.stats,
                "kvbm_latencies": outcome.latencies,
                "kvbm_config": outcome.kvbm_config,
            }

        return {
            "kvbm_bench": 1,
            "options": asdict(self.options),
            "pools_blocks": self.pools,
            "rounds": [{**asdict(r), "speedup": r.speedup} for r in self.rounds],
            "mean_speedup_after_first_round": self.mean_speedup,
            "tier_tokens": self.tier_tokens(),
            "transfers": self.transfers(),
            "outputs_match": self.outputs_match,
            "with_kvbm": run_json(self.with_kvbm),
            "without_kvbm": run_json(self.without_kvbm),
            "machine": _machine(),
        }


def _machine() -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def round_rows(workload: Any, round_of: dict[int, int], with_kvbm: Any, without_kvbm: Any | None) -> list[RoundRow]:
    rows = []
    for number in sorted(set(round_of.values())):
        ids = [rid for rid, rnd in round_of.items() if rnd == number]
        reqs = [with_kvbm.requests[i] for i in ids]
        rows.append(RoundRow(
            round=number,
            num_requests=len(ids),
            num_prompt_tokens=sum(q.prompt_len for q in reqs),
            ttft_without_s=(statistics.fmean(without_kvbm.requests[i].ttft_s for i in ids)
                            if without_kvbm is not None else None),
            ttft_with_s=statistics.fmean(q.ttft_s for q in reqs),
            kvbm_hit_tokens=sum(q.num_connector_hit_tokens for q in reqs),
            device_hit_tokens=sum(q.num_device_hit_tokens for q in reqs),
        ))
    return rows


def write_report(report: BenchReport, output_dir: Path) -> dict[str, str]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "bench.json"
    png_path = output_dir / "bench.png"
    json_path.write_text(json.dumps(report.to_json(), indent=2, default=_json_default) + "\n")
    plot_rounds(report, png_path)
    report.files = {"json": str(json_path), "png": str(png_path)}
    return report.files


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def format_report(report: BenchReport) -> str:
    o = report.options
    lines = []
    rows = report.rounds
    header = f"{'round':>5}  {'reqs':>4}  {'prompt tok':>10}  {'TTFT without':>12}  {'TTFT with':>10}  {'speedup':>7}  {'kvbm hits':>9}"
    lines += [header, "-" * len(header)]
    for r in rows:
        without = f"{r.ttft_without_s * 1000:10.0f} ms" if r.ttft_without_s is not None else f"{'-':>13}"
        speed = f"{r.speedup:6.2f}x" if r.speedup is not None else f"{'-':>7}"
        hits = r.kvbm_hit_tokens / r.num_prompt_tokens if r.num_prompt_tokens else 0.0
        lines.append(f"{r.round + 1:>5}  {r.num_requests:>4}  {r.num_prompt_tokens:>10}  {without:>12}  "
                     f"{r.ttft_with_s * 1000:7.0f} ms  {speed:>7}  {hits:>8.0%}")
    if report.mean_speedup is not None:
        lines.append(f"mean TTFT after the first round: {report.mean_speedup:.2f}x faster with kvbm")
    tiers = report.tier_tokens()
    prompt = tiers["prompt"] or 1
    stats = report.with_kvbm.stats or {}
    lines.append("")
    lines.append("where the prompt tokens of the kvbm run came from:")
    for label, key in (("GPU prefix cache (G1)", "gpu"), ("host memory (G2)", "host"), ("disk (G3)", "disk"),
                       ("computed", "computed")):
        lines.append(f"  {label:<22} {tiers[key]:>9} tokens  {tiers[key] / prompt:6.1%}")
    lines.append(f"  hit rate of kvbm lookups: host {stats.get('host_cache_hit_rate', 0.0):.1%}, "
                 f"disk {stats.get('disk_cache_hit_rate', 0.0):.1%}")
    transfers = report.transfers()
    moved = transfers["bytes"]
    lines.append("")
    lines.append("bytes moved: " + ", ".join(
        f"{label} {_mb(moved[key])}" for label, key in (
            ("GPU->host", "offload_bytes_d2h"), ("host->disk", "offload_bytes_h2d"),
            ("host->GPU", "onboard_bytes_h2d"), ("disk->GPU", "onboard_bytes_d2d"))))
    for kind in ("offload", "onboard"):
        j = transfers["jobs"][kind]
        lines.append(f"  {kind} jobs: {j['jobs']}, mean {j['mean_latency_s'] * 1000:.0f} ms from plan to "
                     "done on all ranks (includes waiting for the forward pass)")
    probe = transfers["probe"]
    if probe:
        lines.append("transfer rate per job (" + f"{next(iter(probe.values()))['blocks']} blocks, "
                     f"{_mb(next(iter(probe.values()))['bytes'])}, idle engine):")
        for direction, rate in probe.items():
            shown = f"{rate['gb_per_s']:.2f} GB/s" if "gb_per_s" in rate else f"failed: {rate['error']}"
            lines.append(f"  {direction:<10} {shown}")
    if report.outputs_match is not None:
        lines.append("")
        lines.append("outputs with kvbm == outputs without: "
                     + ("yes (loaded KV is bit-identical)" if report.outputs_match else "NO"))
    settings = report.with_kvbm.kvbm_config or {}
    if settings.get("metrics"):
        lines.append(f"the leader served Prometheus metrics on port {settings.get('metrics_port')}")
    lines.append(f"GPU pool {report.pools['gpu']} blocks of {o.tokens_per_block} tokens; working set "
                 f"{report.pools['working_set']} blocks; host tier {report.pools['cpu']}, disk tier "
                 f"{report.pools['disk']} blocks")
    return "\n".join(lines)


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB"
