"""A connector that does nothing: the baseline the reference executor compares against.

``NullConnectorScheduler`` matches no tokens (``(0, False)``), never holds blocks after a request
finishes and builds empty metadata; ``NullConnectorWorker`` moves no bytes and reports nothing.
Pass ``NULL_CONNECTOR`` (the pair) as an executor's ``connector``.
"""

from __future__ import annotations

from typing import Any

from kvbm_trtllm.trtllm_api import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    SchedulerOutput,
)

__all__ = ["NullConnectorScheduler", "NullConnectorWorker", "NULL_CONNECTOR"]


class NullConnectorScheduler(KvCacheConnectorScheduler):
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object:
        return None

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        return 0, False

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        return False

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        return None


class NullConnectorWorker(KvCacheConnectorWorker):
    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        return None

    def start_load_kv(self, stream: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        return None

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        return None

    def wait_for_save(self, stream: Any) -> None:
        return None

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        return [], []


NULL_CONNECTOR = (NullConnectorScheduler, NullConnectorWorker)
