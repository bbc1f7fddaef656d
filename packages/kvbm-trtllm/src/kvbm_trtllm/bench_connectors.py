"""Connector classes ``kvbm bench`` runs: kvbm's and the do-nothing baseline, each ticking a
progress callback (``llm_args.extra["bench_on_request_finished"]``) once per finished request.

They add nothing else, so the two runs differ only in the connector. Importable by reference,
so TP ranks in spawned processes can build them (the callback then stays behind: ``None``).
"""

from __future__ import annotations

from typing import Any

from kvbm_trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker
from kvbm_trtllm.executor.null_connector import NullConnectorScheduler, NullConnectorWorker
from kvbm_trtllm.trtllm_api import KvCacheConnectorScheduler

__all__ = ["BenchKvbmLeader", "BenchKvbmWorker", "BenchNullScheduler", "BenchNullWorker"]


def _callback(llm_args: Any):
    extra = getattr(llm_args, "extra", None)
    return extra.get("bench_on_request_finished") if isinstance(extra, dict) else None


class _TicksOnFinish(KvCacheConnectorScheduler):
    """Calls the bench's progress callback once per finished request, then the real scheduler."""

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self._on_finished = _callback(llm_args)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        if self._on_finished is not None:
            self._on_finished()
        # The mixin always precedes a concrete scheduler in the MRO (see the classes below).
        return super().request_finished(request, cache_block_ids)  # type: ignore[safe-super]


class BenchKvbmLeader(_TicksOnFinish, KvbmConnectorLeader):
    pass


class BenchNullScheduler(_TicksOnFinish, NullConnectorScheduler):
    pass


BenchKvbmWorker = KvbmConnectorWorker
BenchNullWorker = NullConnectorWorker
