"""Per-request state the reference executor keeps between iterations.

``_State`` is where a request is in its life (loading, context, generation, saving, done);
``_Request`` is its record: the request state behind the views the connector sees
(``llm_request.py``), its blocks, how much of it is computed, what was reported in
``SchedulerOutput``, the error that failed it, and the times that become its ``RequestResult``.
Both are private to the executor package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kvbm_trtllm.executor.llm_request import LlmRequestState
from kvbm_trtllm.executor.workloads import RequestSpec


class _State(Enum):
    LOADING = "loading"  # parked: async connector load in flight
    CONTEXT = "context"
    GENERATION = "generation"
    SAVING = "saving"  # finished; blocks held for the connector
    DONE = "done"  # finished or failed; blocks released


@dataclass
class _Request:
    spec: RequestSpec
    llm: LlmRequestState
    hashes: list[int]
    arrival_s: float
    arrival_iteration: int
    state: _State = _State.CONTEXT
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # positions whose KV is in the pool
    device_tokens: list[int] = field(default_factory=list)  # prompt + every sampled token
    num_device_hit: int = 0
    num_connector_hit: int = 0
    is_async_load: bool = False
    admitted_iteration: int = -1
    num_reported_tokens: int = 0
    num_reported_blocks: int = 0
    is_reported: bool = False
    num_committed_blocks: int = 0
    first_token_s: float | None = None
    first_token_iteration: int = -1
    finish_s: float = 0.0
    finished_iteration: int = -1
    error: str | None = None  # why TensorRT-LLM's _handle_errors failed it

    @property
    def request_id(self) -> int:
        return self.spec.request_id

    @property
    def prompt_len(self) -> int:
        return self.llm.prompt_len

    @property
    def num_generated(self) -> int:
        return len(self.llm.tokens) - self.prompt_len
