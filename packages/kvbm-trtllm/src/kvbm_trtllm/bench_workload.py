"""The requests of a ``kvbm bench`` run and the pool sizes that make reuse come from kvbm.

Which process: the ``kvbm`` command (or a test). Operations:
- ``build_workload(options) -> (Workload, round_of)``: the requests and each one's round
  (a conversation turn, a question round, a wave of prefix requests).
- ``size_pools(options, workload)``: the GPU pool and tier sizes in blocks. The GPU pool is
  sized below the workload's working set on purpose, so reuse across rounds has to come from
  kvbm's tiers rather than the engine's own prefix cache.
- ``working_set_blocks(workload, tokens_per_block)``: distinct full prompt blocks.
"""

from __future__ import annotations

from typing import Any

from kvbm_trtllm.bench_options import BenchError, ResolvedBenchOptions

__all__ = ["build_workload", "size_pools", "working_set_blocks"]


def build_workload(options: ResolvedBenchOptions) -> tuple[Any, dict[int, int]]:
    from kvbm_trtllm.executor import long_document_qa, multi_turn_chat, prefix_repetition

    o = options
    vocab = o.model_preset["vocab_size"]
    if o.workload == "multi-turn":
        workload = multi_turn_chat(
            num_conversations=o.sessions, num_turns=o.rounds, system_tokens=o.context_tokens,
            user_tokens=o.turn_tokens, assistant_tokens=o.turn_tokens, max_new_tokens=o.max_new_tokens,
            vocab_size=vocab, shared_system_prompt=False, seed=o.seed,
        )
    elif o.workload == "doc-qa":
        workload = long_document_qa(
            num_documents=o.sessions, document_tokens=o.context_tokens, num_questions=o.rounds,
            question_tokens=o.turn_tokens, max_new_tokens=o.max_new_tokens, vocab_size=vocab, seed=o.seed,
        )
    else:
        workload = prefix_repetition(
            num_prefixes=o.sessions, prefix_tokens=o.context_tokens, num_requests=o.sessions * o.rounds,
            suffix_tokens=o.turn_tokens, max_new_tokens=o.max_new_tokens, vocab_size=vocab,
            spacing_iterations=1, seed=o.seed,
        )
    # Every generator numbers requests round by round, ``sessions`` per round.
    round_of = {r.request_id: r.request_id // o.sessions for r in workload.requests}
    return workload, round_of


def _blocks(num_tokens: int, tokens_per_block: int) -> int:
    return -(-num_tokens // tokens_per_block)


def working_set_blocks(workload: Any, tokens_per_block: int) -> int:
    """Distinct full prompt blocks of the workload (what a cache would have to hold)."""
    from kvbm_core.hashing import block_hashes

    seen: set[int] = set()
    for r in workload.requests:
        seen.update(block_hashes(r.prompt, tokens_per_block, 0))
    return len(seen)


def size_pools(options: ResolvedBenchOptions, workload: Any) -> dict[str, int]:
    """GPU pool and tier sizes in blocks: the GPU pool well below the working set."""
    t = options.tokens_per_block
    longest = max(_blocks(len(r.prompt) + r.max_new_tokens, t) for r in workload.requests)
    working_set = working_set_blocks(workload, t)
    gpu = options.gpu_blocks if options.gpu_blocks is not None else min(2 * longest + 2, max(longest, working_set // 4))
    if gpu < longest:
        raise BenchError(
            f"--gpu-blocks {gpu} cannot hold the longest request ({longest} blocks of {t} tokens); "
            f"raise it to at least {longest} or shorten the prompts"
        )
    cpu = options.cpu_blocks if options.cpu_blocks is not None else max(longest, working_set // 2)
    disk = options.disk_blocks if options.disk_blocks is not None else working_set + longest
    return {
        "gpu": gpu,
        "cpu": cpu if "cpu" in options.tiers else 0,
        "disk": disk if "disk" in options.tiers else 0,
        "working_set": working_set,
        "longest_request": longest,
    }
