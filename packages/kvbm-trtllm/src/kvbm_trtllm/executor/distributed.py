"""Collectives between the executor's tensor-parallel ranks (one process per rank).

- ``Comm``: the operations the executor and model use: ``all_gather_cat`` and ``all_reduce``
  (activations), ``broadcast_object`` (rank 0's scheduling plan and connector results, as
  TensorRT-LLM's ``mpi_broadcast``), ``all_gather_object`` (``get_finished`` results, as
  ``mpi_allgather``). ``LocalComm`` is the single-rank no-op version.
- ``TorchDistComm``: the same over ``torch.distributed`` (gloo on the CPU, NCCL on the GPU).
- ``init_process_group(rank, world_size, port, backend)``: joins a local group over TCP.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Comm", "LocalComm", "TorchDistComm", "init_process_group", "free_port"]


class Comm:
    rank: int = 0
    world_size: int = 1

    def all_gather_cat(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def broadcast_object(self, obj: Any) -> Any:
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError


class LocalComm(Comm):
    def all_gather_cat(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


class TorchDistComm(Comm):
    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchDistComm needs torch.distributed initialized first")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_gather_cat(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        dist.all_reduce(tensor)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(
    rank: int, world_size: int, port: int, backend: str, timeout_s: float = 300.0
) -> TorchDistComm:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return TorchDistComm()
