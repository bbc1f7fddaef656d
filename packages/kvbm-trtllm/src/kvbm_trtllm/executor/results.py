"""What a reference-executor run reports: per request, per iteration, and in total.

``RequestResult`` holds one request's output tokens, its time to first token (wall time from
arrival to the first token being visible to the host), where its prompt KV came from (device
prefix reuse, the connector, or computed), and ``error``: the message it was failed with
(TensorRT-LLM's ``_handle_errors``), ``None`` for a request that completed; a failed request
has partial or no output. ``IterationStats`` counts one iteration's batch. ``RunResult``
collects both, with totals and ``errors`` (failed request id -> message).

``request_result(req)`` and ``iteration_stats(...)`` build them from the executor's records.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from kvbm_trtllm.executor.request_state import _Request

__all__ = ["RequestResult", "IterationStats", "RunResult", "request_result"]


@dataclass
class RequestResult:
    request_id: int
    prompt_len: int
    output_tokens: tuple[int, ...]
    num_device_hit_tokens: int
    num_connector_hit_tokens: int
    is_async_load: bool
    arrival_s: float
    first_token_s: float
    finish_s: float
    arrival_iteration: int
    admitted_iteration: int
    first_token_iteration: int
    finished_iteration: int
    error: str | None = None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def num_computed_prompt_tokens(self) -> int:
        return self.prompt_len - self.num_device_hit_tokens - self.num_connector_hit_tokens


@dataclass
class IterationStats:
    iteration: int
    wall_s: float
    num_context_requests: int
    num_context_tokens: int
    num_generation_requests: int
    num_waiting: int
    num_loading: int
    num_saving: int
    num_free_blocks: int
    num_cached_blocks: int


@dataclass
class RunResult:
    requests: dict[int, RequestResult]
    iterations: list[IterationStats] = field(default_factory=list)
    wall_s: float = 0.0
    num_evicted_blocks: int = 0
    rank0_extra: Any = None  # what run_tp's on_rank0 returned

    @property
    def outputs(self) -> dict[int, tuple[int, ...]]:
        return {rid: r.output_tokens for rid, r in sorted(self.requests.items())}

    @property
    def errors(self) -> dict[int, str]:
        return {rid: r.error for rid, r in sorted(self.requests.items()) if r.error is not None}

    @property
    def num_prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests.values())

    @property
    def num_device_hit_tokens(self) -> int:
        return sum(r.num_device_hit_tokens for r in self.requests.values())

    @property
    def num_connector_hit_tokens(self) -> int:
        return sum(r.num_connector_hit_tokens for r in self.requests.values())

    @property
    def num_computed_prompt_tokens(self) -> int:
        return sum(r.num_computed_prompt_tokens for r in self.requests.values())

    def ttfts_s(self) -> list[float]:
        return [r.ttft_s for _, r in sorted(self.requests.items())]

    @property
    def mean_ttft_s(self) -> float:
        return statistics.fmean(self.ttfts_s()) if self.requests else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "num_requests": len(self.requests),
            "num_iterations": len(self.iterations),
            "wall_s": self.wall_s,
            "mean_ttft_s": self.mean_ttft_s,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_device_hit_tokens": self.num_device_hit_tokens,
            "num_connector_hit_tokens": self.num_connector_hit_tokens,
            "num_computed_prompt_tokens": self.num_computed_prompt_tokens,
            "num_evicted_blocks": self.num_evicted_blocks,
        }


def request_result(req: _Request) -> RequestResult:
    return RequestResult(
        request_id=req.request_id,
        prompt_len=req.prompt_len,
        output_tokens=tuple(req.llm.tokens[req.prompt_len :]),
        num_device_hit_tokens=req.num_device_hit,
        num_connector_hit_tokens=req.num_connector_hit,
        is_async_load=req.is_async_load,
        arrival_s=req.arrival_s,
        first_token_s=req.first_token_s if req.first_token_s is not None else float("nan"),
        finish_s=req.finish_s,
        arrival_iteration=req.arrival_iteration,
        admitted_iteration=req.admitted_iteration,
        first_token_iteration=req.first_token_iteration,
        finished_iteration=req.finished_iteration,
        error=req.error,
    )
