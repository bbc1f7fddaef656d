"""What the engine's KV bytes mean: the pool's layout and the model that wrote it.

Runs in every rank's process (leader and worker both derive the model identity, and must agree).

Operations:
- ``model_facts(llm_args) -> ModelFacts``: the model's KV heads and head dim, from the checkpoint's
  ``config.json`` when ``llm_args.model`` is a local directory (TensorRT-LLM's ``KVCacheManager``
  takes them from the same place), else from ``llm_args.extra`` (engines without TensorRT-LLM).
- ``model_identity(llm_args, configured) -> str``: what distinguishes one model's KV from
  another's: the model's name, its revision, a digest of its ``config.json`` and of its weight
  files' names, sizes and modification times, and ``KVBM_MODEL_ID``. Block hashes are salted
  with it and the disk tier's files are keyed on it, so a changed checkpoint never finds the
  KV of the old one.
- ``layout_from_pool(tensor, tokens_per_block, facts)``: the :class:`KvLayout` of TensorRT-LLM's
  primary pool ``[blocks, layers, kv, heads*tokens*head_dim]``, heads and head dim as the model
  says when that multiplies out to the pool's shape.
- ``layout_from_layers(tensors, ...)``: the same for per-layer pools (layer-separate).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from kvbm_core.layout import KvLayout, LayoutKind

log = logging.getLogger("kvbm.layout")

__all__ = ["ModelFacts", "model_facts", "model_identity", "layout_from_pool", "layout_from_layers"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".engine")
_MAX_CONFIG_BYTES = 4 << 20


@dataclass(frozen=True)
class ModelFacts:
    num_kv_heads: int | None = None  # the whole model's; each TP rank holds its share
    head_dim: int | None = None


def _model_dir(llm_args: Any) -> Path | None:
    model = getattr(llm_args, "model", None)
    if model is None:
        return None
    path = Path(str(model))
    return path if path.is_dir() else None


def _read_config(directory: Path | None) -> dict[str, Any] | None:
    if directory is None:
        return None
    path = directory / "config.json"
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ValueError(f"over {_MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("kvbm: cannot read %s (%s); the KV layout comes from the pool's shape", path, exc)
        return None
    return config if isinstance(config, dict) else None


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_facts(llm_args: Any) -> ModelFacts:
    config = _read_config(_model_dir(llm_args))
    if config is not None:
        config = config.get("text_config", config)  # multimodal checkpoints nest it
        num_heads = _positive(config.get("num_attention_heads"))
        num_kv_heads = _positive(config.get("num_key_value_heads")) or num_heads
        head_dim = _positive(config.get("head_dim"))
        hidden = _positive(config.get("hidden_size"))
        if head_dim is None and hidden and num_heads:
            head_dim = hidden // num_heads
        return ModelFacts(num_kv_heads, head_dim)
    extra = getattr(llm_args, "extra", None)
    if isinstance(extra, dict):
        return ModelFacts(_positive(extra.get("num_kv_heads")), _positive(extra.get("head_dim")))
    return ModelFacts()


def _digest(parts: Sequence[str]) -> str:
    return f"{xxhash.xxh3_64_intdigest(chr(0).join(parts).encode()):016x}"


def _checkpoint_signature(directory: Path) -> str:
    entries = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(_WEIGHT_SUFFIXES):
            stat = entry.stat()
            entries.append(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}")
    config = directory / "config.json"
    if config.is_file():
        entries.append(config.read_bytes().decode(errors="replace"))
    return _digest(entries)


def model_identity(llm_args: Any, configured: str | None = None) -> str | None:
    """The model identity blocks are salted with (``None`` when the engine names no model)."""
    model = getattr(llm_args, "model", None)
    parts = []
    if model is not None:
        directory = _model_dir(llm_args)
        parts.append(directory.name if directory is not None else str(model))
        if directory is not None:
            parts.append(f"checkpoint={_checkpoint_signature(directory)}")
    revision = getattr(llm_args, "revision", None)
    if revision:
        parts.append(f"revision={revision}")
    if configured:
        parts.append(f"id={configured}")
    return ";".join(parts) or None


def layout_from_pool(
    tensor: Any, tokens_per_block: int, facts: ModelFacts | int | None = None, tp_size: int = 1
) -> KvLayout:
    """KvLayout of TensorRT-LLM's primary pool ``[blocks, layers, kv, heads*tokens*head_dim]``."""
    if not isinstance(facts, ModelFacts):
        facts = ModelFacts(head_dim=facts)
    shape = list(tensor.shape)
    dtype = str(tensor.dtype).removeprefix("torch.")
    inner = 1
    for dim in shape[3:]:
        inner *= dim
    head_dim = facts.head_dim
    if facts.num_kv_heads and head_dim:
        heads = max(1, facts.num_kv_heads // tp_size)  # fewer heads than ranks: replicated
        if heads * tokens_per_block * head_dim != inner:
            log.warning(
                "kvbm: the model's %d KV heads x head_dim %d (over TP %d) do not match the pool's "
                "%d elements per block and layer; the layout comes from the pool's shape",
                facts.num_kv_heads, head_dim, tp_size, inner,
            )
            head_dim = None
    if head_dim is None or inner % (tokens_per_block * head_dim):
        # Tiers move whole blocks as bytes: heads x head_dim only needs to multiply out right.
        head_dim = inner // tokens_per_block
    return KvLayout.from_pool_shape(shape, tokens_per_block, head_dim, dtype)


def layout_from_layers(
    tensors: Sequence[Any], tokens_per_block: int, facts: ModelFacts | int | None = None, tp_size: int = 1
) -> KvLayout:
    """KvLayout of per-layer pools ``[blocks, kv, heads*tokens*head_dim]`` (layer-separate)."""
    first = tensors[0]
    shape = [first.shape[0], len(tensors), *first.shape[1:]]
    layout = layout_from_pool(_Shaped(shape, first.dtype), tokens_per_block, facts, tp_size)
    return KvLayout(
        layout.num_layers, layout.tokens_per_block, layout.num_kv_heads, layout.head_dim,
        layout.dtype, layout.kv_factor, LayoutKind.LAYER_SEPARATE,
    )


@dataclass
class _Shaped:
    shape: list[int]
    dtype: Any
