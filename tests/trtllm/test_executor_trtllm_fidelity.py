"""The reference executor behaves as TensorRT-LLM does, per version profile, not as kvbm would like.

Each test pins one behaviour TensorRT-LLM has (cited in the executor's modules): the RequestData
shape per version, the two request views, no connector call without block reuse, un-parking from
``context_current_position``, which connector exceptions fail requests and which kill the
engine, layer hooks under CUDA-graph replay, the default profile and the load-error profile.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from kvbm_trtllm.executor import (
    ConnectorContractError,
    Executor,
    ModelConfig,
    NullConnectorScheduler,
    NullConnectorWorker,
    PoolConfig,
    RequestSpec,
    Workload,
    multi_turn_chat,
)
from kvbm_trtllm.trtllm_api import (
    KvCacheConfigLike,
    LlmArgsLike,
    RequestData,
    RequestData12,
)

T = 16
MODEL = ModelConfig.tiny()
SMALL = PoolConfig(num_blocks=12, tokens_per_block=T)


def chat():
    return multi_turn_chat(
        num_conversations=3,
        num_turns=3,
        system_tokens=40,
        user_tokens=24,
        assistant_tokens=16,
        max_new_tokens=3,
        seed=11,
    )


def args(pool: PoolConfig = SMALL, **options) -> LlmArgsLike:
    return LlmArgsLike(
        model=MODEL.name,
        kv_cache_config=KvCacheConfigLike(
            tokens_per_block=T, enable_block_reuse=pool.enable_block_reuse
        ),
        extra={"refconn": options},
    )


@pytest.fixture(scope="module")
def expected():
    pool = PoolConfig(num_blocks=400, tokens_per_block=T, enable_block_reuse=False)
    return Executor(MODEL, pool).run(chat()).outputs


CALLS: list[tuple[str, Any]] = []


class RecordingScheduler(NullConnectorScheduler):
    """Records every call with what it received."""

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        CALLS.clear()

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        CALLS.append(("get_num_new_matched_tokens", request))
        return 0, False

    def update_state_after_alloc(self, request, block_ids):
        CALLS.append(("update_state_after_alloc", request))

    def build_connector_meta(self, scheduler_output):
        CALLS.append(("build_connector_meta", scheduler_output))

    def request_finished(self, request, cache_block_ids):
        CALLS.append(("request_finished", request))
        return False


class RecordingWorker(NullConnectorWorker):
    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        CALLS.append(("get_finished", (finished_gen_req_ids, started_loading_req_ids)))
        return [], []


RECORDING = (RecordingScheduler, RecordingWorker)


def calls(name: str) -> list[Any]:
    return [payload for n, payload in CALLS if n == name]


def one_request(**spec) -> Workload:
    return Workload("one", (RequestSpec(0, tuple(range(1, 41)), 3, **spec),))


# ---- profiles and defaults ---------------------------------------------------------------------


def test_default_profile_is_main_with_trtllm_defaults():
    executor = Executor(MODEL, SMALL, RECORDING)
    assert executor.profile.name == "main"
    assert not executor.profile.has_load_error_api
    assert executor.overlap is True
    assert executor.llm_args.disable_overlap_scheduler is False
    assert executor.llm_args.cuda_graph_config is not None
    assert executor.graphs.batch_sizes == (*range(1, 33), 64, 128)
    assert executor.llm_args.kv_cache_config.enable_partial_reuse is True
    with pytest.raises(ValueError, match="not one of"):
        Executor(MODEL, SMALL, trtllm_version="1.3")


def test_request_data_shape_per_profile():
    workload = one_request(cache_salt="tenant-1")
    Executor(MODEL, SMALL, RECORDING, trtllm_version="1.2").run(workload)
    first = calls("build_connector_meta")[0].new_requests[0]
    assert type(first) is RequestData12
    with pytest.raises(AttributeError):
        first.cache_salt  # noqa: B018
    assert not hasattr(first, "block_hashes")

    Executor(MODEL, SMALL, RECORDING, trtllm_version="main").run(workload)
    outputs = calls("build_connector_meta")
    first = outputs[0].new_requests[0]
    assert type(first) is RequestData
    assert first.cache_salt == "tenant-1"
    assert first.priorities is None
    assert first.new_block_ids_by_layer_group == [first.new_block_ids]
    assert len(first.block_hashes) == 40 // T
    later = outputs[-1].cached_requests[0]
    assert later.block_hashes[: len(first.block_hashes)] == first.block_hashes  # cumulative chain
    other_salt = one_request(cache_salt="tenant-2")
    Executor(MODEL, SMALL, RECORDING).run(other_salt)
    assert calls("build_connector_meta")[0].new_requests[0].block_hashes != first.block_hashes


# ---- request views -----------------------------------------------------------------------------


def test_request_views_have_trtllm_attribute_names_only():
    Executor(MODEL, SMALL, RECORDING).run(one_request(lora_name="adapter-a", cache_salt="t1"))
    (base,) = calls("get_num_new_matched_tokens")
    (allocated,) = calls("update_state_after_alloc")
    (finished,) = calls("request_finished")
    for name in ("lora_name", "cache_salt", "py_lora_path", "py_request_id"):
        assert not hasattr(base, name), name
    with pytest.raises(AttributeError):
        base.lora_name = "x"  # a bound C++ object takes no new attributes
    assert base.is_generation_only_request is False  # a property on the C++ base
    assert base.lora_task_id == zlib.crc32(b"adapter-a")
    assert isinstance(base.cache_salt_id, int) and 0 <= base.cache_salt_id < 2**64
    assert base.get_tokens(0)[:40] == list(range(1, 41)) and base.prompt_len == 40
    with pytest.raises(ValueError, match="beam"):
        base.get_tokens(1)

    assert finished is allocated
    assert callable(allocated.is_generation_only_request)  # a method on the Python subclass
    assert getattr(allocated, "is_generation_only_request", False)  # ... so truthy via getattr
    assert allocated.is_generation_only_request() is False
    assert allocated.py_request_id == 0 and allocated.py_lora_path.endswith("adapter-a")
    assert allocated.lora_task_id == base.lora_task_id
    assert not hasattr(allocated, "lora_name") and not hasattr(allocated, "cache_salt")
    allocated.context_current_position = 7
    assert base.context_current_position == 7  # one state behind both views

    Executor(MODEL, SMALL, RECORDING).run(one_request())
    (plain,) = calls("get_num_new_matched_tokens")
    assert plain.lora_task_id is None and plain.cache_salt_id is None
    assert calls("update_state_after_alloc")[0].py_lora_path is None


def test_lora_task_id_is_stable_across_executors():
    ids = []
    for _ in range(2):
        Executor(MODEL, SMALL, RECORDING).run(one_request(lora_name="adapter-b"))
        ids.append(calls("get_num_new_matched_tokens")[0].lora_task_id)
    assert ids[0] == ids[1] is not None


# ---- block reuse off ---------------------------------------------------------------------------


def test_block_reuse_off_never_asks_the_connector_for_matches():
    pool = PoolConfig(num_blocks=12, tokens_per_block=T, enable_block_reuse=False)
    Executor(MODEL, pool, RECORDING).run(one_request())
    assert calls("get_num_new_matched_tokens") == []
    assert len(calls("update_state_after_alloc")) == 1
    assert calls("build_connector_meta") and calls("get_finished")
    assert len(calls("request_finished")) == 1
    Executor(MODEL, SMALL, RECORDING).run(one_request())
    assert len(calls("get_num_new_matched_tokens")) == 1  # the control: reuse on asks


# ---- un-parking reads context_current_position back ---------------------------------------------


@pytest.fixture
def rewinding(refconn):
    """The reference connector, async, copying nothing, rewinding to the device hit when done."""

    views: dict[int, Any] = {}

    class Scheduler(refconn.RefScheduler):
        def update_state_after_alloc(self, request, block_ids):
            views[request.request_id] = (self, request)
            super().update_state_after_alloc(request, block_ids)

    class Worker(refconn.RefWorker):
        rewind_to = "device_hit"

        def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
            done_saving, done_loading = super().get_finished(
                finished_gen_req_ids, started_loading_req_ids
            )
            for rid in done_loading:
                scheduler, request = views[rid]
                device_hit, n, _ = scheduler.matched[rid]
                if self.rewind_to == "device_hit":
                    request.context_current_position = device_hit
                    scheduler.matched[rid] = (device_hit, 0, False)  # its own check, updated
                else:
                    request.context_current_position = device_hit + n + 1
            return done_saving, done_loading

    return Scheduler, Worker


def test_rewound_position_is_recomputed_from_there(rewinding, expected):
    options = {"async_load": True, "load_delay": 1, "skip_loads": True}
    executor = Executor(MODEL, SMALL, rewinding, llm_args=args(**options))
    result = executor.run(chat())
    assert any(r.is_async_load for r in result.requests.values())
    assert result.outputs == expected  # nothing was loaded: only recompute gives these
    assert result.num_connector_hit_tokens == 0  # every promised token was taken back


def test_position_past_the_promise_is_a_contract_error(rewinding):
    scheduler, worker = rewinding
    worker.rewind_to = "too_far"
    options = {"async_load": True, "load_delay": 1}
    with pytest.raises(ConnectorContractError, match="context_current_position"):
        Executor(MODEL, SMALL, (scheduler, worker), llm_args=args(**options)).run(chat())


# ---- errors ------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def raising_worker(method: str, on_call: int = 1):
    counter = {"n": 0}

    def maybe_raise():
        counter["n"] += 1
        if counter["n"] == on_call:
            raise Boom(f"boom in {method}")

    class Worker(NullConnectorWorker):
        def register_forward_pass_callable(self):
            if method == "forward_pass_callable":
                return maybe_raise
            return None

        def wait_for_save(self, stream):
            if method == "wait_for_save":
                maybe_raise()

        def save_kv_layer(self, layer_idx, stream):
            if method == "save_kv_layer":
                maybe_raise()

        def wait_for_layer_load(self, layer_idx, stream):
            if method == "wait_for_layer_load":
                maybe_raise()

        def start_load_kv(self, stream):
            if method == "start_load_kv":
                maybe_raise()

        def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
            if method == "get_finished":
                maybe_raise()
            return [], []

    return Worker


def raising_scheduler(method: str):
    class Scheduler(NullConnectorScheduler):
        def build_connector_meta(self, scheduler_output):
            if method == "build_connector_meta":
                raise Boom(method)

        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            if method == "get_num_new_matched_tokens":
                raise Boom(method)
            return 0, False

        def update_state_after_alloc(self, request, block_ids):
            if method == "update_state_after_alloc":
                raise Boom(method)

        def request_finished(self, request, cache_block_ids):
            if method == "request_finished":
                raise Boom(method)
            return False

    return Scheduler


def staggered() -> Workload:
    early = tuple(RequestSpec(i, tuple(range(1 + i, 41 + i)), 6) for i in range(3))
    late = RequestSpec(9, tuple(range(5, 45)), 6, arrival_iteration=30)
    return Workload("staggered", (*early, late))


@pytest.mark.parametrize(
    "method,on_call",
    [
        ("wait_for_save", 3),
        ("forward_pass_callable", 3),
        ("save_kv_layer", 1),
        ("wait_for_layer_load", 1),
    ],
)
def test_exception_in_the_forward_step_fails_all_active_requests(method, on_call):
    pool = PoolConfig(num_blocks=40, tokens_per_block=T)
    executor = Executor(MODEL, pool, (NullConnectorScheduler, raising_worker(method, on_call)))
    result = executor.run(staggered())
    assert set(result.errors) == {0, 1, 2}
    assert all(f"boom in {method}" in e for e in result.errors.values())
    assert all(len(result.outputs[i]) < 6 for i in (0, 1, 2))  # partial or no output
    assert result.requests[9].error is None and len(result.outputs[9]) == 6  # the run went on
    assert executor.pool.num_free_blocks == pool.num_blocks  # failed requests' blocks freed


@pytest.mark.parametrize(
    "part,method",
    [
        ("worker", "get_finished"),
        ("worker", "start_load_kv"),
        ("scheduler", "build_connector_meta"),
        ("scheduler", "get_num_new_matched_tokens"),
        ("scheduler", "update_state_after_alloc"),
        ("scheduler", "request_finished"),
    ],
)
def test_exception_outside_the_forward_step_propagates(part, method):
    if part == "worker":
        connector = (NullConnectorScheduler, raising_worker(method))
    else:
        connector = (raising_scheduler(method), NullConnectorWorker)
    with pytest.raises(Boom):
        Executor(MODEL, SMALL, connector).run(one_request())


# ---- CUDA graphs -------------------------------------------------------------------------------


class CountingWorker(NullConnectorWorker):
    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self.counts = {"wait_for_layer_load": 0, "save_kv_layer": 0, "callable": 0, "save": 0}

    def register_forward_pass_callable(self):
        return lambda: self.counts.__setitem__("callable", self.counts["callable"] + 1)

    def wait_for_layer_load(self, layer_idx, stream):
        self.counts["wait_for_layer_load"] += 1

    def save_kv_layer(self, layer_idx, stream):
        self.counts["save_kv_layer"] += 1

    def wait_for_save(self, stream):
        self.counts["save"] += 1


def test_layer_hooks_do_not_fire_on_replayed_decode_batches():
    workload = Workload("one", (RequestSpec(0, tuple(range(1, 41)), 6),))
    connector = (NullConnectorScheduler, CountingWorker)
    graphs = Executor(MODEL, SMALL, connector, overlap=False)
    graphs.run(workload)
    layers = MODEL.num_layers
    # 6 forwards: the prompt (eager), the first decode batch of size 1 (captured), 4 replays.
    assert graphs.worker.counts == {
        "wait_for_layer_load": 2 * layers,
        "save_kv_layer": 2 * layers,
        "callable": 6,
        "save": 6,
    }
    eager = Executor(MODEL, SMALL, connector, overlap=False, cuda_graph_config=None)
    eager.run(workload)
    assert eager.worker.counts["wait_for_layer_load"] == 6 * layers


# ---- load errors -------------------------------------------------------------------------------


@pytest.fixture
def failing_loads(refconn):
    """The reference connector, async, reporting every block it loaded as failed."""

    class Worker(refconn.RefWorker):
        num_error_calls = 0

        def __init__(self, llm_args):
            super().__init__(llm_args)
            self.failed: list[int] = []

        def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
            done_saving, done_loading = super().get_finished(
                finished_gen_req_ids, started_loading_req_ids
            )
            for rid in done_loading:
                self.failed += [block_id for block_id, _ in self.loaded_plans[rid]]
            return done_saving, done_loading

        def start_load_kv(self, stream):
            super().start_load_kv(stream)
            self.loaded_plans.update(self.get_connector_meta().async_loads)

        loaded_plans: dict[int, list[tuple[int, int]]] = {}

        def get_block_ids_with_load_errors(self):
            type(self).num_error_calls += 1
            failed, self.failed = self.failed, []
            return failed

    Worker.loaded_plans = {}
    return refconn.RefScheduler, Worker


def test_load_error_profile_fails_the_request(failing_loads, expected):
    options = {"async_load": True, "load_delay": 1}
    executor = Executor(
        MODEL, SMALL, failing_loads, llm_args=args(**options), trtllm_version="main+load-errors"
    )
    result = executor.run(chat())
    loaded = {rid for rid, r in result.requests.items() if r.is_async_load}
    assert loaded and set(result.errors) == loaded
    assert set(result.errors.values()) == {"KV cache load failure"}
    assert all(result.outputs[rid] == () for rid in loaded)
    assert all(result.outputs[rid] == expected[rid] for rid in result.outputs if rid not in loaded)


def test_main_profile_never_asks_for_load_errors(failing_loads):
    options = {"async_load": True, "load_delay": 1}
    _, worker = failing_loads
    worker.num_error_calls = 0
    result = Executor(MODEL, SMALL, failing_loads, llm_args=args(**options)).run(chat())
    assert worker.num_error_calls == 0
    assert result.errors == {}
    assert any(r.is_async_load for r in result.requests.values())
