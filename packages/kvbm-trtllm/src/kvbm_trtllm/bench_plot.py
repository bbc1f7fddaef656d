"""``bench.png``: mean TTFT per round without kvbm (recompute) and with it.

Which process: the ``kvbm`` command (or a test). ``plot_rounds(report, path)`` draws it with
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbm_trtllm.bench_report import BenchReport

__all__ = ["plot_rounds"]


def plot_rounds(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round + 1 for r in report.rounds]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    # Every round has a time without kvbm exactly when the baseline ran.
    without_ms = [r.ttft_without_s * 1000 for r in report.rounds if r.ttft_without_s is not None]
    if report.without_kvbm is not None and len(without_ms) == len(rounds):
        ax.plot(rounds, without_ms, "o-", color="#888888",
                label="without kvbm (recompute)")
    tiers = " + ".join({"cpu": "G2 host", "disk": "G3 disk"}[t] for t in report.options.tiers)
    ax.plot(rounds, [r.ttft_with_s * 1000 for r in report.rounds], "o-", color="#76b900",
            label=f"with kvbm ({tiers})")
    o = report.options
    ax.set_title(f"kvbm bench: {o.workload}, model {o.model}, {o.device}, TP={o.tp}")
    ax.set_xlabel({"multi-turn": "turn", "doc-qa": "question round"}.get(o.workload, "round"))
    ax.set_ylabel("mean TTFT (ms)")
    ax.set_xticks(rounds)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
