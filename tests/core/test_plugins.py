"""Plugin discovery through the ``kvbm`` entry points, with the example tier as the third party.

Uses the installed workspace: ``kvbm-tier-example`` contributes tier ``mmap`` through its
``example`` entry point and nothing in kvbm names it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import kvbm_core
from kvbm_core.plugins import (
    PluginLoadError,
    PluginNotFoundError,
    TierSpec,
    get_plugin_manager,
    load_discovery_backend,
    load_tier_specs,
    plugin_distributions,
)

pytest.importorskip("kvbm_tier_example", reason="kvbm-tier-example is not installed")


def _spec(name: str, level: int = 5) -> TierSpec:
    return TierSpec(name, name, level, make_storage=lambda ctx: None, make_handlers=lambda s, c: [])  # type: ignore[arg-type,return-value]


class _Plugin:
    def __init__(self, *specs: TierSpec) -> None:
        self.specs = list(specs)

    @kvbm_core.hookimpl
    def kvbm_tier_specs(self) -> list[TierSpec]:
        return self.specs


def test_the_example_tier_is_found_through_its_entry_point() -> None:
    pm = get_plugin_manager()
    specs = load_tier_specs(pm, required=["mmap"])
    assert specs["mmap"].medium == "mmap" and specs["mmap"].level == 4
    assert ("example", "kvbm-tier-example", "0.1.0") in plugin_distributions(pm)


def test_specs_come_ordered_by_level() -> None:
    pm = get_plugin_manager()
    pm.register(_Plugin(_spec("z-deep", 9), _spec("a-shallow", 2)), name="test-extra")
    levels = [spec.level for spec in load_tier_specs(pm).values()]
    assert levels == sorted(levels)


def test_a_blocked_plugin_contributes_nothing() -> None:
    pm = get_plugin_manager(blocked=["example"])
    assert pm.is_blocked("example")
    assert "mmap" not in load_tier_specs(pm)


def test_missing_required_tier_names_it() -> None:
    pm = get_plugin_manager()
    with pytest.raises(
        PluginNotFoundError, match=r"tier plugin\(s\) 'nvme-of' configured but not installed"
    ):
        load_tier_specs(pm, required=["nvme-of"])


def test_a_tier_of_a_disabled_plugin_says_disabled_not_missing() -> None:
    pm = get_plugin_manager(blocked=["cpu"])
    with pytest.raises(PluginNotFoundError) as caught:
        load_tier_specs(pm, required=["cpu"])
    message = str(caught.value)
    assert "disabled by KVBM_DISABLED_PLUGINS" in message and "not installed" not in message
    assert "'cpu'" in message and "remove them from KVBM_DISABLED_PLUGINS" in message


def test_a_missing_tier_mentions_what_is_disabled() -> None:
    pm = get_plugin_manager(blocked=["example"])
    with pytest.raises(PluginNotFoundError, match=r"disables 'example', which may provide it"):
        load_tier_specs(pm, required=["mmap"])


def test_missing_discovery_backend_names_it() -> None:
    with pytest.raises(
        PluginNotFoundError, match=r"discovery backend 'no-such-backend' \(KVBM_DISCOVERY\)"
    ):
        load_discovery_backend(get_plugin_manager(), "no-such-backend")


def test_two_plugins_with_one_tier_name_is_an_error_naming_both() -> None:
    pm = get_plugin_manager()
    pm.register(_Plugin(_spec("mmap")), name="impostor")
    with pytest.raises(
        ValueError,
        match=r"'mmap' is provided by both plugin '(example|impostor)' and plugin '(example|impostor)'",
    ):
        load_tier_specs(pm)


def test_requires_defaults_to_nothing() -> None:
    assert _spec("x").requires == ()


def test_a_broken_entry_point_names_the_plugin_and_how_to_block_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist_info = tmp_path / "kvbm_broken_tier-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kvbm-broken-tier\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text("[kvbm]\nbroken = kvbm_no_such_module.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError) as caught:
        get_plugin_manager()
    message = str(caught.value)
    assert "'broken' (kvbm_no_such_module.plugin, from kvbm-broken-tier)" in message
    assert "KVBM_DISABLED_PLUGINS=broken" in message
    assert "mmap" in load_tier_specs(get_plugin_manager(blocked=["broken"]))
