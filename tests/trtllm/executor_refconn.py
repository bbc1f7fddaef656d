"""An in-memory reference connector for the executor's own tests (not shipped).

It offloads every full prompt block layer by layer in ``save_kv_layer`` into a per-rank dict
(hash -> block bytes), and loads matched prefixes back: synchronously layer by layer in
``wait_for_layer_load``, or asynchronously (completed in ``get_finished`` after a delay).
It learns block ids and tokens only from ``SchedulerOutput`` deltas, and checks the executor's
side of the contract (first appearance carries the whole prompt and all its blocks, the
``computed_position`` rule, deltas add up, each id passed to ``get_finished`` once).

Options come from ``llm_args.extra["refconn"]``: ``async_load`` (bool), ``load_delay`` (get_finished
calls before a load is reported), ``hold_on_finish`` (request_finished returns True),
``save_delay``, ``rank_delay`` (extra calls per rank, so ranks report at different iterations),
``skip_loads`` (claim hits but copy nothing: a negative control), ``bad_matched`` (return this
``(n, async)`` instead), ``bogus_finished_id`` (report an id never passed in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvbm_core.hashing import block_hashes, salt_hash
from kvbm_trtllm.trtllm_api import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    SchedulerOutput,
    current_rank,
)

# Leader state lives in the leader process; tests read it through these module globals.
CALLS: list[tuple[str, Any]] = []


def _options(llm_args: Any) -> dict[str, Any]:
    return dict(getattr(llm_args, "extra", {}).get("refconn", {}))


@dataclass
class Meta:
    saves: list[tuple[int, int]] = field(default_factory=list)  # (block_id, hash)
    loads: list[tuple[int, int]] = field(default_factory=list)  # sync: (block_id, hash)
    async_loads: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # request -> blocks


@dataclass
class _Tracked:
    tokens: list[int]
    block_ids: list[int]
    hashes: list[int]
    num_saved: int = 0


class RefScheduler(KvCacheConnectorScheduler):
    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self.opts = _options(llm_args)
        self.block_size = llm_args.kv_cache_config.tokens_per_block
        self.salt = salt_hash("refconn")
        self.stored: set[int] = set()
        self.tracked: dict[int, _Tracked] = {}
        self.matched: dict[int, tuple[int, int, bool]] = {}  # id -> (device hit, n, async)
        self.pending_sync: list[tuple[int, int]] = []
        self.pending_async: dict[int, list[tuple[int, int]]] = {}
        self.allocated: dict[int, list[int]] = {}
        self.seen_new: set[int] = set()
        CALLS.clear()

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        CALLS.append(("get_num_new_matched_tokens", (request.request_id, num_computed_tokens)))
        if "bad_matched" in self.opts:
            return tuple(self.opts["bad_matched"])
        prompt = request.get_tokens(0)[: request.prompt_len]
        hashes = block_hashes(prompt, self.block_size, self.salt)
        num_hit = 0
        for h in hashes[: (request.prompt_len - 1) // self.block_size]:
            if h not in self.stored:
                break
            num_hit += 1
        n = max(0, num_hit * self.block_size - num_computed_tokens)
        is_async = bool(self.opts.get("async_load")) and n > 0
        self.matched[request.request_id] = (num_computed_tokens, n, is_async)
        return n, is_async

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        CALLS.append(("update_state_after_alloc", (request.request_id, list(block_ids))))
        rid = request.request_id
        self.allocated[rid] = list(block_ids)
        assert len(block_ids) == -(-request.prompt_len // self.block_size)
        device_hit, n, is_async = self.matched.get(rid, (0, 0, False))
        if n == 0:
            return
        prompt = request.get_tokens(0)[: request.prompt_len]
        hashes = block_hashes(prompt, self.block_size, self.salt)
        first, last = device_hit // self.block_size, (device_hit + n) // self.block_size
        loads = [(block_ids[i], hashes[i]) for i in range(first, last)]
        if is_async:
            self.pending_async[rid] = loads
        else:
            self.pending_sync.extend(loads)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object:
        CALLS.append(("build_connector_meta", scheduler_output))
        meta = Meta(loads=self.pending_sync, async_loads=self.pending_async)
        self.pending_sync, self.pending_async = [], {}
        for data in scheduler_output.new_requests:
            self._check_first_appearance(data)
            self.tracked[data.request_id] = _Tracked(
                list(data.new_tokens),
                list(data.new_block_ids),
                block_hashes(data.new_tokens, self.block_size, self.salt),
            )
            self._plan_saves(data, meta)
        for data in scheduler_output.cached_requests:
            tracked = self.tracked[data.request_id]
            tracked.tokens += data.new_tokens
            tracked.block_ids += data.new_block_ids
            self._plan_saves(data, meta)
        return meta

    def _check_first_appearance(self, data: Any) -> None:
        rid = data.request_id
        assert rid not in self.seen_new, f"request {rid} in new_requests twice"
        self.seen_new.add(rid)
        assert data.new_block_ids == self.allocated[rid], (
            "first report must carry all prompt blocks"
        )
        device_hit, n, is_async = self.matched.get(rid, (0, 0, False))
        expected = device_hit + n if is_async else device_hit
        assert data.computed_position == expected, (
            f"request {rid}: computed_position {data.computed_position}, expected {expected}"
        )

    def _plan_saves(self, data: Any, meta: Meta) -> None:
        tracked = self.tracked[data.request_id]
        prompt_blocks = len(tracked.hashes)
        done = (data.computed_position + data.num_scheduled_tokens) // self.block_size
        for i in range(tracked.num_saved, min(done, prompt_blocks)):
            if tracked.hashes[i] not in self.stored:
                meta.saves.append((tracked.block_ids[i], tracked.hashes[i]))
                self.stored.add(tracked.hashes[i])
        tracked.num_saved = max(tracked.num_saved, min(done, prompt_blocks))

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        CALLS.append(("request_finished", (request.request_id, list(cache_block_ids))))
        return bool(self.opts.get("hold_on_finish"))


class RefWorker(KvCacheConnectorWorker):
    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self.opts = _options(llm_args)
        self.rank = current_rank()
        self.store: dict[int, torch.Tensor] = {}
        self.kv: torch.Tensor | None = None
        self.num_register_calls = 0
        self.saving: dict[int, int] = {}  # id -> get_finished calls left
        self.loading: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        self.passed_ids: set[tuple[str, int]] = set()
        self.async_plans: dict[int, list[tuple[int, int]]] = {}
        self.num_loaded_blocks = 0

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        self.num_register_calls += 1
        assert self.num_register_calls == 1, "register_kv_caches called twice"
        self.kv = kv_cache_tensor

    def start_load_kv(self, stream: Any) -> None:
        meta = self.get_connector_meta()
        self.async_plans.update(meta.async_loads)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        if self.opts.get("skip_loads"):
            return
        for block_id, h in self.get_connector_meta().loads:
            self.kv[block_id, layer_idx].copy_(self.store[h][layer_idx])
            self.num_loaded_blocks += layer_idx == 0

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        for block_id, h in self.get_connector_meta().saves:
            if h not in self.store:
                self.store[h] = torch.empty_like(self.kv[block_id])
            self.store[h][layer_idx].copy_(self.kv[block_id, layer_idx])

    def wait_for_save(self, stream: Any) -> None:
        return None

    def _delay(self, key: str) -> int:
        return int(self.opts.get(key, 0)) + self.rank * int(self.opts.get("rank_delay", 0))

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        for rid in finished_gen_req_ids:
            assert ("save", rid) not in self.passed_ids, f"saving id {rid} passed twice"
            self.passed_ids.add(("save", rid))
            self.saving[rid] = self._delay("save_delay")
        for rid in started_loading_req_ids:
            assert ("load", rid) not in self.passed_ids, f"loading id {rid} passed twice"
            self.passed_ids.add(("load", rid))
            self.loading[rid] = (self._delay("load_delay"), self.async_plans.pop(rid))
        done_saving = self._tick(self.saving)
        done_loading = []
        for rid in list(self.loading):
            left, blocks = self.loading[rid]
            if left > 0:
                self.loading[rid] = (left - 1, blocks)
                continue
            del self.loading[rid]
            if not self.opts.get("skip_loads"):
                for block_id, h in blocks:
                    self.kv[block_id].copy_(self.store[h])
            done_loading.append(rid)
        if self.opts.get("bogus_finished_id") is not None:
            done_saving.append(self.opts["bogus_finished_id"])
        return done_saving, done_loading

    @staticmethod
    def _tick(pending: dict[int, int]) -> list[int]:
        done = [rid for rid, left in pending.items() if left <= 0]
        for rid in list(pending):
            if pending[rid] <= 0:
                del pending[rid]
            else:
                pending[rid] -= 1
        return done
