"""Deterministic request streams for the reference executor (same seed, same requests).

- ``RequestSpec``: one request: prompt tokens, ``max_new_tokens``, and when it arrives: at an
  iteration (``arrival_iteration``), at a wall-clock offset from the start of the run
  (``arrival_s``), and/or once another request has finished (``after``, for conversation turns).
- ``Workload``: a named tuple of requests.
- ``multi_turn_chat``: each turn's prompt is the previous turn's prompt + an assistant reply +
  new user tokens, so conversations grow past what the GPU pool keeps between turns.
- ``long_document_qa``: a few long documents, each asked several questions in rounds.
- ``prefix_repetition``: requests sharing one of a few long prefixes, with distinct suffixes.

Assistant replies inside a conversation are drawn from the seed, not from the model, so a
workload does not depend on the model's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RequestSpec", "Workload", "multi_turn_chat", "long_document_qa", "prefix_repetition"]


@dataclass(frozen=True)
class RequestSpec:
    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_iteration: int = 0
    arrival_s: float | None = None
    after: int | None = None
    lora_name: str | None = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"request {self.request_id}: empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_new_tokens must be >= 1")


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[RequestSpec, ...]

    def __post_init__(self) -> None:
        ids = [r.request_id for r in self.requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"workload {self.name!r}: duplicate request ids")
        known = set(ids)
        for r in self.requests:
            if r.after is not None and r.after not in known:
                raise ValueError(f"request {r.request_id} waits for unknown request {r.after}")

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)


def _tokens(rng: np.random.Generator, n: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(int(x) for x in rng.integers(1, vocab_size, size=n))


def multi_turn_chat(
    *,
    num_conversations: int = 4,
    num_turns: int = 4,
    system_tokens: int = 64,
    user_tokens: int = 48,
    assistant_tokens: int = 32,
    max_new_tokens: int = 4,
    vocab_size: int = 512,
    stagger_iterations: int = 1,
    shared_system_prompt: bool = True,
    seed: int = 0,
) -> Workload:
    rng = np.random.default_rng(seed)
    system = _tokens(rng, system_tokens, vocab_size)
    histories = [
        system if shared_system_prompt else _tokens(rng, system_tokens, vocab_size)
        for _ in range(num_conversations)
    ]
    requests: list[RequestSpec] = []
    previous: list[int | None] = [None] * num_conversations
    for _ in range(num_turns):
        for conv in range(num_conversations):
            prompt = histories[conv] + _tokens(rng, user_tokens, vocab_size)
            request_id = len(requests)
            requests.append(
                RequestSpec(
                    request_id,
                    prompt,
                    max_new_tokens,
                    arrival_iteration=conv * stagger_iterations,
                    after=previous[conv],
                )
            )
            previous[conv] = request_id
            histories[conv] = prompt + _tokens(rng, assistant_tokens, vocab_size)
    return Workload("multi_turn_chat", tuple(requests))


def long_document_qa(
    *,
    num_documents: int = 4,
    document_tokens: int = 256,
    num_questions: int = 3,
    question_tokens: int = 16,
    max_new_tokens: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
) -> Workload:
    rng = np.random.default_rng(seed)
    documents = [_tokens(rng, document_tokens, vocab_size) for _ in range(num_documents)]
    requests: list[RequestSpec] = []
    previous: list[int | None] = [None] * num_documents
    for _ in range(num_questions):
        for doc, document in enumerate(documents):
            prompt = document + _tokens(rng, question_tokens, vocab_size)
            requests.append(RequestSpec(len(requests), prompt, max_new_tokens, after=previous[doc]))
            previous[doc] = len(requests) - 1
    return Workload("long_document_qa", tuple(requests))


def prefix_repetition(
    *,
    num_prefixes: int = 4,
    prefix_tokens: int = 128,
    num_requests: int = 16,
    suffix_tokens: int = 16,
    max_new_tokens: int = 4,
    vocab_size: int = 512,
    spacing_iterations: int = 2,
    seed: int = 0,
) -> Workload:
    rng = np.random.default_rng(seed)
    prefixes = [_tokens(rng, prefix_tokens, vocab_size) for _ in range(num_prefixes)]
    requests = [
        RequestSpec(
            i,
            prefixes[int(rng.integers(num_prefixes))] + _tokens(rng, suffix_tokens, vocab_size),
            max_new_tokens,
            arrival_iteration=i * spacing_iterations,
        )
        for i in range(num_requests)
    ]
    return Workload("prefix_repetition", tuple(requests))
