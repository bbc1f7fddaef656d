"""What one ``kvbm bench`` run measured, in-process (TP=1) or from rank 0's process (TP>1).

Which process: the ``kvbm`` command, or rank 0's process for ``leader_stats``. Operations:
- ``RunOutcome``: the executor's result, wall time, and for a kvbm run the leader's stats,
  latency sums, kvbm settings and the probed transfer rates.
- ``leader_stats(leader) -> (stats, latencies)``: the leader's counters and gauges, and each
  latency histogram's sum and count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["RunOutcome", "leader_stats"]


@dataclass
class RunOutcome:
    result: Any  # RunResult
    wall_s: float
    stats: dict[str, float] | None = None  # the leader's counters and gauges (kvbm runs)
    latencies: dict[str, dict[str, float]] | None = None  # sum/count per histogram
    kvbm_config: dict[str, Any] | None = None
    transfer_rates: dict[str, dict[str, float | str]] | None = None  # see probe_transfers


def leader_stats(leader: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The leader's counters and gauges, and each latency histogram's sum and count."""
    stats = leader.stats
    server = getattr(leader, "metrics_server", None)
    if server is not None:
        histograms = server.collector.update_histograms()
        latencies = {n: {"sum_s": h.total_s, "count": h.num_observed} for n, h in histograms.items()}
    else:
        latencies = {n: {"sum_s": math.fsum(v), "count": len(v)} for n, v in stats.take_latencies().items()}
    return stats.snapshot(), latencies
