"""A small Llama-style model whose attention reads and writes the executor's block pool.

Operations (every rank runs them on its own shard):
- ``ReferenceModel(config, comm)``: random weights drawn from ``config.seed`` (the same global
  weights on every rank; each rank keeps its head / intermediate shard).
- ``forward(chunks, pool, on_layer_start, on_layer_end) -> list[int]``: one iteration. Each
  ``SequenceChunk`` computes ``token_ids`` at positions ``start_pos...``; every layer first
  writes the chunk's K/V into the pool, then attends to all positions ``[0, end)`` of the
  request *read back from the pool*, so KV computed this iteration and KV loaded by a connector
  take the same path. The hooks run before / after each decoder layer (where TensorRT-LLM calls
  ``wait_for_layer_load`` / ``save_kv_layer``). Returns the greedy next token of every chunk
  with ``needs_logits``.

Batch invariance (``config.batch_invariant``, default on): every matmul runs on fixed-shape
tiles (``tile_rows`` query rows, ``tile_keys`` keys, zero padding), attention combines key tiles
with an online softmax in a fixed order, and a fully masked key tile is an exact no-op. So the
K/V bytes written for a position, and each sampled token, do not depend on how the prompt was
chunked or batched with other requests: KV a connector loads back is bit-identical to what
recompute would write. (This rests on same-shape GEMMs computing each row independently of
the others: true of the CPU BLAS and of cuBLAS on H100 in bf16, as the tests check; a library
that breaks it fails those tests.) Row-parallel linears gather their input over ranks and use the full
weight, so TP=2 output is bit-identical to TP=1. With it off, attention is SDPA and row-parallel
linears all-reduce partial sums, and single-token steps share one batched SDPA call: faster,
but greedy outputs may then differ between a run that loads KV and one that recomputes it.

Measured on one H100 (torch 2.11, ``llama_8b_shape``, 2026-11-28): prefill of 2048 tokens
237 ms batch-invariant (tiles 256 x 1024) vs 81 ms fast; a decode step of 8 requests at 2k
context 321 ms vs 37 ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kvbm_trtllm.executor.distributed import Comm, LocalComm
from kvbm_trtllm.executor.pool import BlockPool

__all__ = ["ModelConfig", "SequenceChunk", "ReferenceModel"]


class _Pages:
    """Block ids -> pages of one layer's page space (its layer group's, ``layer_groups.py``)."""

    def __init__(self, pool: BlockPool, layer_idx: int) -> None:
        self.pool = pool
        self.layer_idx = layer_idx

    def __call__(self, block_ids: list[int], device: torch.device) -> torch.Tensor:
        return self.pool.layer_pages(self.layer_idx, torch.tensor(block_ids, device=device))

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    vocab_size: int = 512
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    batch_invariant: bool = True
    tile_rows: int = 32
    tile_keys: int = 32
    name: str = "reference-llama-tiny"
    sliding_window: int | None = None  # keys per query in ``sliding_window_layers``
    sliding_window_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.dtype {self.dtype!r} not one of {sorted(_DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if bool(self.sliding_window_layers) != (self.sliding_window is not None):
            raise ValueError(
                "set sliding_window and sliding_window_layers together (a window size and the "
                f"layers that use it), got {self.sliding_window} and {self.sliding_window_layers}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"sliding_window_layers {bad} outside 0..{self.num_layers - 1}")

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (``None``: full attention)."""
        windowed = set(self.sliding_window_layers)
        return tuple(
            self.sliding_window if i in windowed else None for i in range(self.num_layers)
        )

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """2 layers, hidden 64, fp32 on the CPU: for tests."""
        return replace(cls(), **overrides)

    @classmethod
    def llama_8b_shape(cls, **overrides) -> ModelConfig:
        """Llama-3-8B's shapes with random weights, bf16 on the GPU."""
        base = cls(
            num_layers=32,
            hidden_size=4096,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=128256,
            dtype="bfloat16",
            device="cuda",
            tile_rows=256,
            tile_keys=1024,
            name="reference-llama-8b-shape",
        )
        return replace(base, **overrides)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class SequenceChunk:
    """Tokens of one request computed in one iteration."""

    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    needs_logits: bool

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class _LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


Hook = Callable[[int], None]


class ReferenceModel:
    def __init__(self, config: ModelConfig, comm: Comm | None = None, device: str | None = None):
        self.config = config
        self.comm = comm or LocalComm()
        tp = self.comm.world_size
        if config.num_kv_heads % tp or config.intermediate_size % tp:
            raise ValueError(
                f"tensor-parallel size {tp} must divide num_kv_heads ({config.num_kv_heads}) "
                f"and intermediate_size ({config.intermediate_size})"
            )
        self.device = torch.device(device or config.device)
        self.dtype = config.torch_dtype
        self.num_local_heads = config.num_heads // tp
        self.num_local_kv_heads = config.num_kv_heads // tp
        self.local_intermediate = config.intermediate_size // tp
        self._tensor_index = 0
        self.embed = self._param((config.vocab_size, config.hidden_size), 1.0)
        self.layers = [self._build_layer() for _ in range(config.num_layers)]
        self.final_norm = torch.ones(config.hidden_size, dtype=self.dtype, device=self.device)
        self.lm_head = self._param((config.vocab_size, config.hidden_size))
        half = torch.arange(0, config.head_dim, 2, dtype=torch.float32, device=self.device)
        self._inv_freq = 1.0 / (config.rope_theta ** (half / config.head_dim))

    # ---- weights -------------------------------------------------------------------------

    def _param(self, shape: tuple[int, int], std: float | None = None) -> torch.Tensor:
        """The next global weight tensor, identical on every rank for a given seed."""
        self._tensor_index += 1
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.config.seed * 1_000_003 + self._tensor_index)
        scale = std if std is not None else 1.0 / math.sqrt(shape[1])
        full = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32)
        return (full * scale).to(self.dtype)

    def _rows(self, weight: torch.Tensor, num_shards_rows: int) -> torch.Tensor:
        """This rank's contiguous share of ``weight``'s output rows."""
        rank = self.comm.rank
        return weight[rank * num_shards_rows : (rank + 1) * num_shards_rows].contiguous()

    def _build_layer(self) -> _LayerWeights:
        c = self.config
        d = c.head_dim
        wq = self._param((c.num_heads * d, c.hidden_size))
        wk = self._param((c.num_kv_heads * d, c.hidden_size))
        wv = self._param((c.num_kv_heads * d, c.hidden_size))
        wo = self._param((c.hidden_size, c.num_heads * d))
        wg = self._param((c.intermediate_size, c.hidden_size))
        wu = self._param((c.intermediate_size, c.hidden_size))
        wd = self._param((c.hidden_size, c.intermediate_size))
        qkv = torch.cat(
            [
                self._rows(wq, self.num_local_heads * d),
                self._rows(wk, self.num_local_kv_heads * d),
                self._rows(wv, self.num_local_kv_heads * d),
            ]
        )
        gate_up = torch.cat(
            [self._rows(wg, self.local_intermediate), self._rows(wu, self.local_intermediate)]
        )
        ones = torch.ones(c.hidden_size, dtype=self.dtype, device=self.device)
        return _LayerWeights(
            input_norm=ones,
            qkv=qkv,
            o=wo if self._gathers else self._cols(wo, self.num_local_heads * d),
            post_norm=ones.clone(),
            gate_up=gate_up,
            down=wd if self._gathers else self._cols(wd, self.local_intermediate),
        )

    def _cols(self, weight: torch.Tensor, width: int) -> torch.Tensor:
        rank = self.comm.rank
        return weight[:, rank * width : (rank + 1) * width].contiguous()

    @property
    def _gathers(self) -> bool:
        return self.config.batch_invariant or self.comm.world_size == 1

    # ---- building blocks -------------------------------------------------------------------

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.config.batch_invariant:
            return F.linear(x, weight)
        rows = self.config.tile_rows
        num_rows = x.shape[0]
        pad = (-num_rows) % rows
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        # Same-shape GEMMs on fresh (aligned) tiles give each row bits independent of the others.
        return torch.cat([F.linear(tile.clone(), weight) for tile in x.split(rows)])[:num_rows]

    def _row_parallel(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._gathers:
            return self._linear(self.comm.all_gather_cat(x.contiguous(), dim=1), weight)
        return self.comm.all_reduce(self._linear(x, weight))

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return xf.to(self.dtype) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``[tokens, heads, head_dim]`` by position (Llama's rotate-half convention)."""
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * emb.cos() + rotated * emb.sin()).to(self.dtype)

    # ---- forward -------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        chunks: Sequence[SequenceChunk],
        pool: BlockPool,
        on_layer_start: Hook | None = None,
        on_layer_end: Hook | None = None,
    ) -> list[int]:
        if not chunks:
            return []
        dev = self.device
        t = pool.tokens_per_block
        tokens = torch.tensor([x for c in chunks for x in c.token_ids], device=dev)
        positions = torch.cat([torch.arange(c.start_pos, c.end_pos, device=dev) for c in chunks])
        slot_blocks = torch.tensor(
            [c.block_ids[p // t] for c in chunks for p in range(c.start_pos, c.end_pos)],
            device=dev,
        )
        slot_offsets = positions % t
        h = self.embed[tokens]
        for layer_idx, weights in enumerate(self.layers):
            if on_layer_start is not None:
                on_layer_start(layer_idx)
            h = self._layer(
                layer_idx, weights, h, chunks, positions, slot_blocks, slot_offsets, pool
            )
            if on_layer_end is not None:
                on_layer_end(layer_idx)
        rows, offset = [], 0
        for c in chunks:
            offset += len(c.token_ids)
            if c.needs_logits:
                rows.append(offset - 1)
        if not rows:
            return []
        last = self._rms_norm(h[torch.tensor(rows, device=dev)], self.final_norm)
        logits = self._linear(last, self.lm_head).float()
        return logits.argmax(dim=-1).tolist()

    def _layer(
        self,
        layer_idx: int,
        w: _LayerWeights,
        h: torch.Tensor,
        chunks: Sequence[SequenceChunk],
        positions: torch.Tensor,
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
        pool: BlockPool,
    ) -> torch.Tensor:
        d = self.config.head_dim
        hq, hk = self.num_local_heads, self.num_local_kv_heads
        qkv = self._linear(self._rms_norm(h, w.input_norm), w.qkv)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=1)
        q = self._rope(q.reshape(-1, hq, d), positions)
        k = self._rope(k.reshape(-1, hk, d), positions)
        k_pool, v_pool = pool.layer_view(layer_idx, 0), pool.layer_view(layer_idx, 1)
        slot_pages = pool.layer_pages(layer_idx, slot_blocks)
        k_pool[slot_pages, :, slot_offsets, :] = k.to(pool.dtype)
        v_pool[slot_pages, :, slot_offsets, :] = v.reshape(-1, hk, d).to(pool.dtype)
        window = self.config.layer_windows[layer_idx]
        pages = _Pages(pool, layer_idx)
        attn = torch.empty_like(q)
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + len(c.token_ids))
        decode_rows = []
        for i, c in enumerate(chunks):
            if len(c.token_ids) == 1 and not self.config.batch_invariant:
                decode_rows.append(i)
                continue
            keys, values = self._gather(c, k_pool, v_pool, pages, window)
            rows = slice(starts[i], starts[i + 1])
            attn[rows] = self._attend(q[rows], keys, values, c.start_pos, window).to(q.dtype)
        if decode_rows:
            decode_idx = torch.tensor([starts[i] for i in decode_rows], device=q.device)
            attn[decode_idx] = self._attend_decode_batch(
                q[decode_idx], [chunks[i] for i in decode_rows], k_pool, v_pool, pages, window
            )
        attn = attn.reshape(-1, hq * d)
        h = h + self._row_parallel(attn, w.o)
        gate, up = self._linear(self._rms_norm(h, w.post_norm), w.gate_up).chunk(2, dim=1)
        return h + self._row_parallel(F.silu(gate) * up, w.down)

    def _gather(
        self,
        chunk: SequenceChunk,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        pages: _Pages,
        window: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``[0, end)`` from the pool, as ``[heads, tokens, head_dim]``.

        Under a sliding window the positions no query of the chunk reads are zeroed rather
        than read: their pages may hold anything (V2 reports them as ``-1``).
        """
        t = k_pool.shape[2]
        num_blocks = -(-chunk.end_pos // t)
        ids = pages(chunk.block_ids[:num_blocks], k_pool.device)
        group = self.num_local_heads // self.num_local_kv_heads
        first_read = 0 if window is None else max(0, chunk.start_pos - window + 1)

        def take(pool_view: torch.Tensor) -> torch.Tensor:
            x = (
                pool_view[ids]
                .permute(1, 0, 2, 3)
                .reshape(self.num_local_kv_heads, -1, pool_view.shape[3])
            )[:, : chunk.end_pos]
            if first_read:
                x = x.clone()
                x[:, :first_read] = 0
            return x.repeat_interleave(group, dim=0)

        return take(k_pool), take(v_pool)

    def _attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        start_pos: int,
        window: int | None = None,
    ) -> torch.Tensor:
        """Causal attention of ``q`` ``[n, heads, d]`` at ``start_pos...``; returns ``[n, heads, d]``."""
        n = q.shape[0]
        q_pos = torch.arange(start_pos, start_pos + n, device=q.device)
        if not self.config.batch_invariant:
            k_pos = torch.arange(keys.shape[1], device=q.device)[None, :]
            mask = k_pos <= q_pos[:, None]
            if window is not None:
                mask &= k_pos > q_pos[:, None] - window
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                keys[None].to(q.dtype),
                values[None].to(q.dtype),
                attn_mask=mask,
            )
            return out[0].transpose(0, 1)
        rows = self.config.tile_rows
        qf = q.float().transpose(0, 1) * (1.0 / math.sqrt(self.config.head_dim))
        pad = (-n) % rows
        if pad:
            qf = torch.cat([qf, qf.new_zeros(qf.shape[0], pad, qf.shape[2])], dim=1)
            q_pos = torch.cat([q_pos, q_pos.new_full((pad,), start_pos + n - 1)])
        kf, vf = self._pad_keys(keys.float()), self._pad_keys(values.float())
        tiles = [
            self._attend_tile(
                qf[:, i : i + rows].clone(),
                q_pos[i : i + rows],
                min(start_pos + i + rows, start_pos + n) - 1,
                kf,
                vf,
                window,
            )
            for i in range(0, qf.shape[1], rows)
        ]
        return torch.cat(tiles, dim=1)[:, :n].transpose(0, 1)

    def _attend_decode_batch(
        self,
        q: torch.Tensor,
        chunks: Sequence[SequenceChunk],
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        pages: _Pages,
        window: int | None,
    ) -> torch.Tensor:
        """One SDPA call for all single-token steps (fast path only): ``q`` is ``[B, heads, d]``."""
        t = k_pool.shape[2]
        num_blocks = [-(-c.end_pos // t) for c in chunks]
        width = max(num_blocks)
        table = pages(
            [b for c, n in zip(chunks, num_blocks, strict=True) for b in c.block_ids[:n] + [c.block_ids[0]] * (width - n)],
            q.device,
        ).view(len(chunks), width)
        group = self.num_local_heads // self.num_local_kv_heads

        def take(pool_view: torch.Tensor) -> torch.Tensor:
            x = pool_view[table].permute(0, 2, 1, 3, 4)  # [B, kv heads, blocks, tokens, d]
            x = x.reshape(len(chunks), self.num_local_kv_heads, width * t, -1)
            return x.repeat_interleave(group, dim=1).to(q.dtype)

        lengths = torch.tensor([c.end_pos for c in chunks], device=q.device)
        k_pos = torch.arange(width * t, device=q.device)[None, :]
        mask = k_pos < lengths[:, None]
        if window is not None:
            mask &= k_pos >= lengths[:, None] - window
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], take(k_pool), take(v_pool), attn_mask=mask[:, None, None, :]
        )
        return out[:, :, 0, :]

    def _pad_keys(self, x: torch.Tensor) -> torch.Tensor:
        pad = (-x.shape[1]) % self.config.tile_keys
        return torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], dim=1) if pad else x

    def _attend_tile(
        self,
        q: torch.Tensor,
        q_pos: torch.Tensor,
        max_pos: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        window: int | None = None,
    ) -> torch.Tensor:
        """Online softmax over fixed-size key tiles, in position order.

        A key tile masked out for a row is an exact no-op for it; a row whose every key so far
        is masked (before its window) keeps ``m = -inf`` and a zero accumulator.
        """
        size = self.config.tile_keys
        heads, rows, d = q.shape
        m = q.new_full((heads, rows), -math.inf)
        denom = q.new_zeros((heads, rows))
        acc = q.new_zeros((heads, rows, d))
        num_tiles = max_pos // size + 1
        for j in range(num_tiles):
            k_pos = torch.arange(j * size, (j + 1) * size, device=q.device)
            scores = torch.bmm(q, keys[:, j * size : (j + 1) * size].transpose(1, 2).contiguous())
            masked = k_pos[None, None, :] > q_pos[None, :, None]
            if window is not None:
                masked = masked | (k_pos[None, None, :] <= q_pos[None, :, None] - window)
            scores = scores.masked_fill(masked, -math.inf)
            m_new = torch.maximum(m, scores.amax(dim=-1))
            # Equal to m_new wherever any key was seen, so full attention is unchanged.
            m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - m_ref)
            p = torch.exp(scores - m_ref[..., None])
            denom = denom * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + torch.bmm(
                p, values[:, j * size : (j + 1) * size].contiguous()
            )
            m = m_new
        return acc / denom[..., None]
