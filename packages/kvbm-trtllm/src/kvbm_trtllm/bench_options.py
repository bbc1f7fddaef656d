"""What ``kvbm bench`` runs: its options, their machine-dependent defaults and their checks.

Which process: the ``kvbm`` command (or a test). Operations:
- ``BenchOptions``: what to run (workload, model size, device, TP, tier sizes, the GPU pool)
  and where to write. ``BenchOptions.resolve() -> ResolvedBenchOptions`` fills the
  device-dependent defaults (model, device and the workload sizes are then set) and raises
  :class:`BenchError` naming a bad option and its fix. Everything else in the bench takes
  resolved options. (Checks against this machine's memory and disk are
  :mod:`kvbm_trtllm.bench_checks`.)
- ``MODEL_PRESETS`` (model sizes) and ``WORKLOADS`` (workload names): the choices offered.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["BenchError", "BenchOptions", "ResolvedBenchOptions", "MODEL_PRESETS", "WORKLOADS"]


WORKLOADS = ("multi-turn", "doc-qa", "prefix")

# name -> ModelConfig fields. ``small`` is sized so prefill compute dominates on a 2-core CPU
# while a round still takes seconds; ``8b`` is Llama-3-8B's shape for a GPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=512, tile_rows=32, tile_keys=32),
    "small": dict(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                  intermediate_size=1536, vocab_size=4096, tile_rows=64, tile_keys=128),
    "medium": dict(num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=64,
                   intermediate_size=2816, vocab_size=8192, tile_rows=64, tile_keys=64),
    "8b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256, tile_rows=128, tile_keys=256,
               dtype="bfloat16"),
}


class BenchError(ValueError):
    """A bad bench option: names it and the fix."""


@dataclass(frozen=True)
class BenchOptions:
    workload: str = "multi-turn"
    model: str | None = None  # None: "small" on the CPU, "8b" on a GPU
    device: str | None = None  # None: "cuda" when a GPU is visible, else "cpu"
    tp: int = 1
    sessions: int | None = None  # conversations / documents / distinct prefixes
    rounds: int | None = None  # turns / questions per document / waves of prefix requests
    context_tokens: int | None = None  # system prompt / document / shared prefix
    turn_tokens: int | None = None  # user message (and assistant reply) / question / suffix
    max_new_tokens: int = 4
    tokens_per_block: int = 32
    gpu_blocks: int | None = None  # None: ~2 of the longest requests, at most 1/4 of the working set
    cpu_blocks: int | None = None  # None: half of the working set
    disk_blocks: int | None = None  # None: all of it
    cpu_cache_gb: float | None = None
    disk_cache_gb: float | None = None
    disk_dir: str | None = None  # None: a temporary directory, removed afterwards
    tiers: tuple[str, ...] = ("cpu", "disk")
    disk_offload_filter: bool = False  # Dynamo's filter: only blocks hit twice go to disk
    baseline: bool = True
    metrics_port: int | None = None
    seed: int = 0
    output_dir: str = "kvbm-bench"

    def resolve(self) -> ResolvedBenchOptions:
        """Fill the defaults that depend on the machine; check every option."""
        device = self.device or _default_device()
        _check_device(device)
        model = self.model or ("8b" if device.startswith("cuda") else "small")
        if model not in MODEL_PRESETS:
            raise BenchError(f"--model {model!r} is unknown; choose one of {', '.join(MODEL_PRESETS)}")
        if self.workload not in WORKLOADS:
            raise BenchError(f"--workload {self.workload!r} is unknown; choose one of {', '.join(WORKLOADS)}")
        on_gpu = device.startswith("cuda")
        sizes = _default_sizes(self.workload, on_gpu, model == "tiny")
        values = {f.name: getattr(self, f.name) for f in fields(BenchOptions)}
        values.update(
            device=device,
            model=model,
            sessions=sizes["sessions"] if self.sessions is None else self.sessions,
            rounds=sizes["rounds"] if self.rounds is None else self.rounds,
            context_tokens=sizes["context_tokens"] if self.context_tokens is None else self.context_tokens,
            turn_tokens=sizes["turn_tokens"] if self.turn_tokens is None else self.turn_tokens,
        )
        resolved = ResolvedBenchOptions(**values)
        resolved._check()
        return resolved

    def _check(self) -> None:
        positive = {
            "--tp": self.tp, "--sessions": self.sessions, "--rounds": self.rounds,
            "--context-tokens": self.context_tokens, "--turn-tokens": self.turn_tokens,
            "--max-new-tokens": self.max_new_tokens, "--tokens-per-block": self.tokens_per_block,
        }
        for name, value in positive.items():
            if value is None or value < 1:
                raise BenchError(f"{name} {value} must be a whole number >= 1")
        for name, value in (("--gpu-blocks", self.gpu_blocks), ("--cpu-blocks", self.cpu_blocks),
                            ("--disk-blocks", self.disk_blocks)):
            if value is not None and value < 0:
                raise BenchError(f"{name} {value} must be >= 0")
        for name, size in (("--cpu-cache-gb", self.cpu_cache_gb), ("--disk-cache-gb", self.disk_cache_gb)):
            if size is not None and not size >= 0:
                raise BenchError(f"{name} {size} must be a number of GB >= 0")
        unknown = [t for t in self.tiers if t not in ("cpu", "disk")]
        if unknown:
            raise BenchError(f"--tiers {','.join(self.tiers)}: unknown tier {unknown[0]!r}; use cpu, disk or cpu,disk")
        if "disk" in self.tiers and "cpu" not in self.tiers:
            raise BenchError("--tiers disk needs the cpu tier too (a disk tier is fed from host "
                             "memory, as in Dynamo's KVBM); use --tiers cpu,disk")
        preset = MODEL_PRESETS[str(self.model)]
        if preset["num_kv_heads"] % self.tp:
            raise BenchError(f"--tp {self.tp} must divide the {self.model} model's "
                             f"{preset['num_kv_heads']} KV heads")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise BenchError(f"--metrics-port {self.metrics_port} must be a TCP port (0 picks a free one)")

    @property
    def model_preset(self) -> dict[str, Any]:
        return MODEL_PRESETS[str(self.model)]


@dataclass(frozen=True, kw_only=True)
class ResolvedBenchOptions(BenchOptions):
    """``BenchOptions`` after ``resolve()``: the machine-dependent defaults are filled in.

    Only ``resolve()`` should build one; it has checked every option. The fields keep their
    places, so ``asdict`` (the ``options`` of ``bench.json``) is unchanged.
    """

    model: str
    device: str
    sessions: int
    rounds: int
    context_tokens: int
    turn_tokens: int


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise BenchError(f"--device {device!r} is unknown; use cpu or cuda")
    import torch

    if not torch.cuda.is_available():
        raise BenchError("--device cuda but no CUDA GPU is visible (or torch is a CPU build); use --device cpu")


def _default_sizes(workload: str, on_gpu: bool, is_tiny: bool) -> dict[str, int]:
    if is_tiny:
        return dict(sessions=4, rounds=3, context_tokens=96, turn_tokens=32)
    scale = 2 if on_gpu else 1
    if workload == "multi-turn":
        return dict(sessions=6, rounds=4, context_tokens=1024 * scale, turn_tokens=128 * scale)
    if workload == "doc-qa":
        return dict(sessions=6, rounds=4, context_tokens=1536 * scale, turn_tokens=64)
    return dict(sessions=6, rounds=4, context_tokens=1024 * scale, turn_tokens=64)
