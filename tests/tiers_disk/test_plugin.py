"""The plugin module: spec, storage from a TierContext, handlers by available storages."""

from __future__ import annotations

import pytest
import torch

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.plugins import TierContext
from kvbm_core.transfer import DevicePool
from kvbm_tiers_disk import plugin
from kvbm_tiers_disk.storage import DiskStorage


@pytest.fixture
def ctx(layout, cache_dir):
    config = KvbmConfig(cpu_cache_gb=1, disk_cache_gb=1, disk_cache_dir=str(cache_dir))
    return TierContext(
        layout, 8, rank=1, world_size=2, config=config, options={"disk_io_threads": 2}
    )


def test_spec():
    (spec,) = plugin.kvbm_tier_specs()
    assert (spec.name, spec.medium, spec.level, spec.requires) == ("disk", "disk", 3, ("cpu",))


def test_make_storage_follows_the_context(ctx, cache_dir):
    disk = plugin.make_storage(ctx)
    try:
        assert isinstance(disk, DiskStorage)
        assert disk.num_slots == 8 and disk.layout == ctx.layout
        assert disk.path.parent == cache_dir and "rank1" in disk.path.name
        assert disk.is_o_direct == disk.stats["o_direct"]
    finally:
        disk.close()


def test_disable_o_direct_knob(ctx):
    disk = plugin.make_storage(
        TierContext(ctx.layout, 4, config=ctx.config.replace(disk_disable_o_direct=True))
    )
    assert not disk.is_o_direct
    disk.close()


@pytest.mark.parametrize(
    "options",
    [
        {"disk_io_threads": 0},
        {"disk_io_depth": -1},
        {"disk_index_flush_secs": "soon"},
        {"disk_verify_on_open": "yes"},
        {"disk_verify_in_background": 1},
    ],
)
def test_bad_options_are_config_errors(ctx, options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        plugin.make_storage(TierContext(ctx.layout, 4, config=ctx.config, options=options))


def test_handlers_for_the_storages_present(ctx, make_host):
    disk = plugin.make_storage(ctx)
    pool = DevicePool(
        [
            torch.zeros(
                4, ctx.layout.num_layers, 2, ctx.layout.elements_per_region, dtype=torch.float16
            )
        ],
        ctx.layout,
    )
    try:
        everything = plugin.make_handlers(
            {"disk": disk, "cpu": make_host(ctx.layout, 6), "gpu": pool}, ctx
        )
        pairs = {(h.src_medium, h.dst_medium) for h in everything}
        assert pairs == {("cpu", "disk"), ("disk", "cpu"), ("gpu", "disk"), ("disk", "gpu")}
        only_gpu = plugin.make_handlers({"disk": disk, "gpu": pool}, ctx)
        assert {(h.src_medium, h.dst_medium) for h in only_gpu} == {
            ("gpu", "disk"),
            ("disk", "gpu"),
        }
        for handler in everything + only_gpu:
            handler.close()
    finally:
        disk.close()
