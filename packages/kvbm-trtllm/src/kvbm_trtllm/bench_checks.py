"""``kvbm bench``'s options checked against this machine before the first run.

``check_tiers(options, pools)`` then ``check_before_runs(options, pools, settings)`` raise ``BenchError`` (one line naming the
option and the fix; the command exits 2) for what would otherwise fail, or bench nothing,
only after the baseline had already run: no tier at all, a tier of zero blocks, a tier
below one block, a host tier larger than the available memory, and a ``--disk-dir`` that is
not writable or not private (the same checks as the disk tier's, see
``kvbm_core.private_dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.private_dir import ensure_private_dir
from kvbm_trtllm.bench_options import BenchError

__all__ = ["check_tiers", "check_before_runs", "bytes_per_block"]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def bytes_per_block(options: Any) -> int:
    """Bytes of one block of the bench's model, over every rank: K and V of every layer."""
    preset = options.model_preset
    itemsize = _DTYPE_BYTES[preset.get("dtype", "float32")]
    return (preset["num_layers"] * 2 * preset["num_kv_heads"] * preset["head_dim"]
            * options.tokens_per_block * itemsize)


def check_tiers(options: Any, pools: dict[str, int]) -> None:
    """At least one tier, each of at least one block (before any kvbm setting is built)."""
    if not options.tiers:
        raise BenchError("--tiers names no tier, so there would be nothing to bench; use "
                         "--tiers cpu or --tiers cpu,disk")
    for tier in options.tiers:
        if pools[tier] < 1:
            raise BenchError(f"--{tier}-blocks {pools[tier]}: the {tier} tier needs at least one "
                             f"block; raise it, or leave {tier} out of --tiers")


def check_before_runs(options: Any, pools: dict[str, int], settings: dict[str, Any]) -> None:
    """The run's kvbm settings against this machine: sizes in blocks, memory, --disk-dir."""
    try:
        config = KvbmConfig.from_env(overrides=settings)
        num_bytes = bytes_per_block(options)
        num_cpu_blocks = config.num_cpu_blocks(num_bytes)
        config.num_disk_blocks(num_bytes)
    except ConfigError as exc:
        raise BenchError(f"kvbm config: {exc}") from None
    _check_host_memory(num_cpu_blocks * num_bytes)
    if "disk" in options.tiers and options.disk_dir is not None:
        try:
            ensure_private_dir(Path(options.disk_dir), "--disk-dir")
        except ConfigError as exc:
            raise BenchError(str(exc)) from None


def _check_host_memory(num_bytes: int) -> None:
    from kvbm_tiers_cpu.memory import check_host_memory
    try:
        check_host_memory(num_bytes)
    except ConfigError as exc:
        raise BenchError(f"{exc} (--cpu-cache-gb / --cpu-blocks)") from None
