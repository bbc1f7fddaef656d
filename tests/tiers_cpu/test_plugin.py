"""The cpu tier as kvbm finds it: through its ``kvbm`` entry point and pluggy."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

from kvbm_core import (
    ConfigError,
    KvbmConfig,
    TierContext,
    TransferEngine,
    get_plugin_manager,
    load_tier_specs,
)
from kvbm_core.plugins import plugin_distributions
from kvbm_tiers_cpu import GpuToHostHandler, HostToGpuHandler, PinnedHostStorage
from kvbm_tiers_cpu.plugin import check_options


def _only_cpu():
    """Block every other kvbm plugin, so a broken neighbour cannot fail these tests."""
    return [ep.name for ep in importlib.metadata.entry_points(group="kvbm") if ep.name != "cpu"]


def _spec():
    return load_tier_specs(get_plugin_manager(blocked=_only_cpu()), required=["cpu"])["cpu"]


def test_entry_point_provides_the_cpu_tier():
    pm = get_plugin_manager(blocked=_only_cpu())
    spec = load_tier_specs(pm, required=["cpu"])["cpu"]
    assert (spec.name, spec.medium, spec.level) == ("cpu", "cpu", 2)
    assert ("cpu", "kvbm-tiers-cpu", "0.1.0") in plugin_distributions(pm)


def test_blocked_plugin_is_not_loaded():
    specs = load_tier_specs(get_plugin_manager(blocked=["cpu", *_only_cpu()]))
    assert "cpu" not in specs


def test_spec_builds_storage_and_handlers_that_move_blocks(kv):
    spec = _spec()
    layout = kv.make_layout(kv.LS)
    config = KvbmConfig(cpu_cache_override_num_blocks=32, leader_worker_init_timeout_secs=42)
    ctx = TierContext(layout, 32, device="cpu", config=config, options={"cpu_staging_mib": 1})
    storage = spec.make_storage(ctx)
    assert isinstance(storage, PinnedHostStorage) and not storage.is_pinned_memory
    assert storage.init_timeout_s == 42 and storage.is_ready
    pool = kv.make_pool(layout, 16)
    handlers = spec.make_handlers({"gpu": pool, "cpu": storage}, ctx)
    assert {type(h) for h in handlers} == {GpuToHostHandler, HostToGpuHandler}
    assert {(h.src_medium, h.dst_medium) for h in handlers} == {("gpu", "cpu"), ("cpu", "gpu")}
    assert handlers[0].rows_per_buffer == (1 << 20) // layout.bytes_per_block
    engine = TransferEngine(handlers)
    job = kv.job("gpu", "cpu", [3, 4], [30, 1])
    engine.submit([job])
    (result,) = engine.wait(timeout=30)
    assert result.ok and result.num_bytes == 2 * layout.bytes_per_block
    np.testing.assert_array_equal(storage.host_view()[[30, 1]], kv.block_bytes(pool, [3, 4]))
    engine.close()
    storage.close()


def test_tuning_comes_from_options_then_environment(kv, monkeypatch):
    spec = _spec()
    layout = kv.make_layout(kv.FC)
    monkeypatch.setenv("DYN_KVBM_CPU_STAGING_MIB", "2")
    ctx = TierContext(layout, 8, device="cpu")
    storage = spec.make_storage(ctx)
    offload, _ = spec.make_handlers({"gpu": kv.make_pool(layout, 4), "cpu": storage}, ctx)
    assert offload.rows_per_buffer == (2 << 20) // layout.bytes_per_block
    monkeypatch.setenv("KVBM_CPU_PIN_THREADS", "many")
    with pytest.raises(ConfigError, match=r"KVBM_CPU_PIN_THREADS='many' is invalid: expected a whole number > 0"):
        spec.make_storage(ctx)
    monkeypatch.delenv("KVBM_CPU_PIN_THREADS")
    with pytest.raises(ConfigError, match=r"cpu_zero_copy='sometimes' is invalid: expected auto, true or false"):
        spec.make_handlers({"gpu": kv.make_pool(layout, 4), "cpu": storage}, TierContext(layout, 8, options={"cpu_zero_copy": "sometimes"}))
    with pytest.raises(ValueError, match="zero-copy transfers need CUDA, Triton"):
        spec.make_handlers({"gpu": kv.make_pool(layout, 4), "cpu": storage}, TierContext(layout, 8, options={"cpu_zero_copy": "on"}))
    bad = TierContext(layout, 8, device="cpu", options={"cpu_huge_pages": "maybe"})
    with pytest.raises(ConfigError, match=r"cpu_huge_pages='maybe' is invalid"):
        spec.make_storage(bad)


def test_handlers_need_the_pool_and_the_tier_storage(kv):
    spec = _spec()
    layout = kv.make_layout(kv.FC)
    ctx = TierContext(layout, 8, device="cpu")
    storage = spec.make_storage(ctx)
    with pytest.raises(TypeError, match=r"storages\['gpu'\] must be a kvbm_core.DevicePool"):
        spec.make_handlers({"gpu": storage, "cpu": storage}, ctx)


def test_options_are_declared_and_read_from_the_kvbm_mapping(kv):
    spec = _spec()
    assert {o.name for o in spec.options} >= {"cpu_pin_threads", "cpu_staging_mib", "cpu_zero_copy"}
    config = KvbmConfig(tier_options={"cpu_staging_mib": 3})
    options = check_options(TierContext(kv.make_layout(kv.FC), 8, config=config))
    assert options["staging_bytes"] == 3 << 20
