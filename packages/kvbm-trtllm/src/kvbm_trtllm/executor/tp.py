"""Tensor-parallel runs of the reference executor: one spawned process per rank.

``run_tp(tp_size, workload, model_config, pool_config, connector=None, **executor_kwargs)``
starts ``tp_size`` processes (``spawn``), joins them in a ``torch.distributed`` group (gloo for a
CPU model, NCCL with one GPU per rank for a CUDA model), runs the same ``Executor`` on every
rank (each with its head shard of weights and pool; the connector scheduler on rank 0 only)
and returns rank 0's ``RunResult``. A rank that fails raises ``RuntimeError`` here with that
rank's traceback. Connector classes must be importable by the child processes (they are
pickled by reference; children inherit the parent's ``sys.path``). ``on_rank0(executor)``, a
module-level function, runs on rank 0 after the run while the connector is still up; its
return value comes back as ``RunResult.rank0_extra``. Every rank closes its executor.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kvbm_trtllm.executor.distributed import free_port, init_process_group
from kvbm_trtllm.executor.model import ModelConfig
from kvbm_trtllm.executor.pool import PoolConfig
from kvbm_trtllm.executor.results import RunResult
from kvbm_trtllm.executor.workloads import Workload

__all__ = ["run_tp"]


def _rank_main(
    rank: int,
    tp_size: int,
    port: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: Any,
) -> None:
    import torch
    import torch.distributed as dist

    from kvbm_trtllm.executor.executor import Executor

    workload, model_config, pool_config, connector, on_rank0 = args
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // tp_size))
        on_gpu = model_config.device.startswith("cuda")
        comm = init_process_group(rank, tp_size, port, "nccl" if on_gpu else "gloo")
        device = f"cuda:{rank}" if on_gpu else "cpu"
        executor = Executor(
            model_config, pool_config, connector, comm=comm, device=device, **kwargs
        )
        try:
            result = executor.run(workload)
            comm.barrier()
            if rank == 0 and on_rank0 is not None:
                result = replace(result, rank0_extra=on_rank0(executor))
        finally:
            executor.close()
        results.put((rank, "ok", result if rank == 0 else None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_tp(
    tp_size: int,
    workload: Workload,
    model_config: ModelConfig,
    pool_config: PoolConfig,
    connector: Any = None,
    *,
    timeout_s: float = 600.0,
    on_rank0: Callable[[Any], Any] | None = None,
    **executor_kwargs: Any,
) -> RunResult:
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if model_config.num_kv_heads % tp_size or model_config.intermediate_size % tp_size:
        raise ValueError(
            f"tp_size {tp_size} must divide num_kv_heads ({model_config.num_kv_heads}) and "
            f"intermediate_size ({model_config.intermediate_size})"
        )
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    args = (workload, model_config, pool_config, connector, on_rank0)
    procs = [
        ctx.Process(target=_rank_main, args=(rank, tp_size, port, args, executor_kwargs, results))
        for rank in range(tp_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcomes) < tp_size:
            try:
                rank, status, payload = results.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(
                    f"TP run: no answer from ranks {sorted(set(range(tp_size)) - set(outcomes))} in {timeout_s} s"
                ) from None
            outcomes[rank] = (status, payload)
            if status == "error":
                break
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcomes) < tp_size else 60)
            if p.is_alive():
                p.terminate()
                p.join()
    errors = {r: tb for r, (status, tb) in outcomes.items() if status == "error"}
    if errors:
        rank, tb = min(errors.items())
        raise RuntimeError(f"TP run failed on rank {rank}:\n{tb}")
    return outcomes[0][1]
