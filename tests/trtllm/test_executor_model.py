"""The paged model: KV bytes and sampled tokens independent of chunking and batching."""

from __future__ import annotations

import torch

from kvbm_trtllm.executor import BlockPool, ModelConfig, PoolConfig, ReferenceModel, SequenceChunk

T = 8


def new_pool(config: ModelConfig, num_blocks: int = 16) -> BlockPool:
    return BlockPool(
        PoolConfig(num_blocks=num_blocks, tokens_per_block=T),
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=config.torch_dtype,
        device="cpu",
    )


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (n,), generator=g).tolist()


def run_chunks(model, pool, tokens, blocks, sizes):
    """Compute ``tokens`` in chunks of ``sizes``; return the token sampled after the last."""
    start, out = 0, None
    for size in sizes:
        end = start + size
        out = model.forward(
            [SequenceChunk(tokens[start:end], start, blocks, needs_logits=end == len(tokens))], pool
        )
        start = end
    assert start == len(tokens)
    return out


def test_chunked_and_unchunked_prefill_write_identical_kv_bytes():
    config = ModelConfig.tiny(tile_rows=16, tile_keys=16)
    model = ReferenceModel(config)
    tokens = prompt(77, seed=1)
    blocks = list(range(10))
    results = []
    for sizes in ([77], [5, 13, 1, 40, 18], [16] * 4 + [13], [1] * 77):
        pool = new_pool(config)
        token = run_chunks(model, pool, tokens, blocks, sizes)
        results.append((pool.tensor.clone(), token))
    for kv, token in results[1:]:
        assert torch.equal(kv, results[0][0])
        assert token == results[0][1]


def test_kv_does_not_depend_on_what_else_is_in_the_batch():
    config = ModelConfig.tiny()
    model = ReferenceModel(config)
    a, b = prompt(40, seed=2), prompt(70, seed=3)
    alone = new_pool(config)
    model.forward([SequenceChunk(a, 0, list(range(5)), True)], alone)
    batched = new_pool(config)
    out = model.forward(
        [
            SequenceChunk(b[:33], 0, list(range(5, 14)), False),
            SequenceChunk(a, 0, list(range(5)), True),
        ],
        batched,
    )
    assert torch.equal(alone.tensor[:5], batched.tensor[:5])
    assert len(out) == 1


def test_prefix_read_back_from_other_blocks_gives_same_continuation():
    """KV copied into different blocks (what a connector load does) continues identically."""
    config = ModelConfig.tiny()
    model = ReferenceModel(config)
    tokens = prompt(50, seed=4)
    pool = new_pool(config, num_blocks=20)
    first = run_chunks(model, pool, tokens, list(range(7)), [50])
    reference_kv = pool.tensor.clone()
    moved = list(range(10, 17))
    pool.tensor[10:13] = pool.tensor[0:3]  # 24 "loaded" tokens in new blocks
    pool.tensor[0:10] = 0
    second = model.forward([SequenceChunk(tokens[24:], 24, moved, True)], pool)
    assert second == first
    assert torch.equal(pool.tensor[10:17], reference_kv[0:7])


def test_fast_path_computes_the_same_function():
    exact = ReferenceModel(ModelConfig.tiny())
    fast = ReferenceModel(ModelConfig.tiny(batch_invariant=False))
    tokens = prompt(45, seed=5)
    pools = [new_pool(exact.config), new_pool(fast.config)]
    for model, pool in zip((exact, fast), pools, strict=True):
        run_chunks(model, pool, tokens, list(range(6)), [20, 25])
    assert torch.allclose(pools[0].tensor, pools[1].tensor, rtol=1e-4, atol=1e-4)
    assert pools[0].tensor.abs().sum() > 0


def test_attention_matches_a_dense_causal_reference():
    """Layer 0's V is the projection of the embedding; its attention output is checked via K/V."""
    config = ModelConfig.tiny(num_layers=1)
    model = ReferenceModel(config)
    tokens = prompt(19, seed=6)
    pool = new_pool(config)
    run_chunks(model, pool, tokens, list(range(3)), [19])
    w = model.layers[0]
    x = model._rms_norm(model.embed[torch.tensor(tokens)], w.input_norm)
    d, hk = config.head_dim, config.num_kv_heads
    v = (x @ w.qkv.T)[:, (config.num_heads + hk) * d :].reshape(-1, hk, d)
    v_pool = pool.layer_view(0, 1)[:3].permute(1, 0, 2, 3).reshape(hk, -1, d)[:, :19]
    assert torch.allclose(v_pool.transpose(0, 1), v, rtol=1e-5, atol=1e-5)


def test_weights_depend_on_seed_only():
    a, b = ReferenceModel(ModelConfig.tiny()), ReferenceModel(ModelConfig.tiny())
    c = ReferenceModel(ModelConfig.tiny(seed=1))
    assert torch.equal(a.layers[1].down, b.layers[1].down)
    assert not torch.equal(a.layers[1].down, c.layers[1].down)


def test_fast_path_batched_decode_matches_exact_path():
    """Single-token steps of several requests go through one batched SDPA call on the fast path."""
    exact = ReferenceModel(ModelConfig.tiny())
    fast = ReferenceModel(ModelConfig.tiny(batch_invariant=False))
    seqs = [prompt(n, seed=10 + n) for n in (9, 30, 17)]
    tables = [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]
    tokens = {}
    for name, model in (("exact", exact), ("fast", fast)):
        pool = new_pool(model.config, num_blocks=15)
        first = model.forward(
            [SequenceChunk(s, 0, b, True) for s, b in zip(seqs, tables, strict=True)], pool
        )
        steps = [
            SequenceChunk([tok], len(s), b, True)
            for s, b, tok in zip(seqs, tables, first, strict=True)
        ]
        tokens[name] = (first, model.forward(steps, pool), pool.tensor.clone())
    assert tokens["exact"][:2] == tokens["fast"][:2]
    assert torch.allclose(tokens["exact"][2], tokens["fast"][2], rtol=1e-4, atol=1e-4)
