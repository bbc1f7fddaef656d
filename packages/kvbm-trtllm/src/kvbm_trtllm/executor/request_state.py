"""Per-request state the reference executor keeps between iterations.

``_State`` is where a request is in its life (loading, context, generation, saving, done);
``_Request`` is its record: the TensorRT-LLM-like request the connector sees, its blocks, how much
of it is computed, what was reported in ``SchedulerOutput`` and the times that become its
``RequestResult``. Both are private to the executor package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kvbm_trtllm.executor.workloads import RequestSpec
from kvbm_trtllm.trtllm_api import LlmRequestLike


class _State(Enum):
    LOADING = "loading"  # parked: async connector load in flight
    CONTEXT = "context"
    GENERATION = "generation"
    SAVING = "saving"  # finished; blocks held for the connector
    DONE = "done"


@dataclass
class _Request:
    spec: RequestSpec
    llm: LlmRequestLike
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

    @property
    def request_id(self) -> int:
        return self.spec.request_id

    @property
    def prompt_len(self) -> int:
        return self.llm.prompt_len

    @property
    def num_generated(self) -> int:
        return self.llm.get_num_tokens() - self.prompt_len
