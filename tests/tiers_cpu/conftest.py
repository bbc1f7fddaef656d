"""Shared helpers for the cpu tier tests (fixture ``kv``): layouts, pools of random bytes,
reading blocks as G2 stores them, and running jobs to completion."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvbm_core import DevicePool, JobResult, KvLayout, LayoutKind, TransferHandler, TransferJob

_job_ids = itertools.count(1)

FC = LayoutKind.FULLY_CONTIGUOUS
LS = LayoutKind.LAYER_SEPARATE


def make_layout(kind: LayoutKind, num_layers: int = 4, heads: int = 2, tokens: int = 4, head_dim: int = 8) -> KvLayout:
    return KvLayout(num_layers, tokens, heads, head_dim, dtype="bfloat16", kind=kind)


def _random_fill(tensors: Sequence[torch.Tensor], seed: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for t in tensors:
        noise = torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=generator)
        t.view(torch.uint8).view(-1).copy_(noise.to(t.device))


def make_pool(layout: KvLayout, num_blocks: int, device: str = "cpu", arrangement: str = "separate") -> DevicePool:
    """A pool of random bytes shaped as an engine registers it.

    Layer-separate arrangements: ``separate`` (one allocation per layer), ``layer_major`` (layer
    tensors carved from one buffer) and ``block_major`` (per-layer views of a
    ``[blocks, layers, kv, ...]`` buffer, so each layer tensor is strided).
    """
    dtype = getattr(torch, layout.dtype)
    kv, inner, num_layers = layout.kv_factor, layout.elements_per_region, layout.num_layers
    if layout.kind is FC:
        tensors = [torch.empty((num_blocks, num_layers, kv, inner), dtype=dtype, device=device)]
        _random_fill(tensors, num_blocks)
        return DevicePool(tensors, layout)
    if arrangement == "separate":
        tensors = [torch.empty((num_blocks, kv, inner), dtype=dtype, device=device) for _ in range(num_layers)]
        _random_fill(tensors, num_blocks)
    elif arrangement == "layer_major":
        whole = torch.empty((num_layers, num_blocks, kv, inner), dtype=dtype, device=device)
        _random_fill([whole], num_blocks)
        tensors = list(whole.unbind(0))
    else:
        whole = torch.empty((num_blocks, num_layers, kv, inner), dtype=dtype, device=device)
        _random_fill([whole], num_blocks)
        tensors = [whole[:, layer] for layer in range(num_layers)]
    return DevicePool(tensors, layout)


def block_bytes(pool: DevicePool, ids: Sequence[int]) -> np.ndarray:
    """``[len(ids), bytes_per_block]`` uint8: each block's pieces back to back, as G2 stores them."""
    index = torch.as_tensor(list(ids), dtype=torch.long, device=pool.tensors[0].device)
    pieces = [t.index_select(0, index).contiguous().view(torch.uint8).reshape(len(ids), -1) for t in pool.tensors]
    return torch.cat(pieces, dim=1).cpu().numpy()


def job(src: str, dst: str, src_ids: Sequence[int], dst_ids: Sequence[int]) -> TransferJob:
    return TransferJob(next(_job_ids), src, dst, tuple(int(i) for i in src_ids), tuple(int(i) for i in dst_ids))


def run(
    handler: TransferHandler,
    batches: Sequence[Sequence[TransferJob]],
    ready: object = None,
    timeout_s: float = 30.0,
    submitted: Sequence[TransferJob] = (),
) -> dict[int, JobResult]:
    """Submit every batch before polling, then poll until each job (and each already
    ``submitted`` one) is reported exactly once."""
    expected = {j.job_id for batch in [*batches, submitted] for j in batch}
    for batch in batches:
        handler.submit(list(batch), ready)
    results: dict[int, JobResult] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < len(expected):
        for result in handler.poll():
            assert result.job_id in expected, f"unknown job {result.job_id}"
            assert result.job_id not in results, f"job {result.job_id} reported twice"
            results[result.job_id] = result
        assert time.monotonic() < deadline, f"jobs never reported: {sorted(expected - set(results))}"
        time.sleep(0.0005)
    assert handler.num_pending == 0
    assert handler.poll() == []
    return results


@pytest.fixture
def kv() -> SimpleNamespace:
    return SimpleNamespace(
        FC=FC, LS=LS, make_layout=make_layout, make_pool=make_pool, block_bytes=block_bytes, job=job, run=run
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)
