"""The built-in "disk" tier (kvbm-tiers-disk) passes the tier conformance kit.

Loaded through its entry point like any third-party tier; on a machine without CUDA the GPU
pool is a CPU tensor.
"""

from importlib.metadata import entry_points
from importlib.util import find_spec

import pytest

from kvbm_core.testing import TierConformance

_PLUGIN = next((ep.value for ep in entry_points(group="kvbm") if ep.name == "disk"), None)
if _PLUGIN is None or find_spec(_PLUGIN.split(":")[0]) is None:
    pytest.skip(
        f"kvbm-tiers-disk is not installed (entry point 'disk' -> {_PLUGIN} not importable)",
        allow_module_level=True,
    )


class TestBuiltinTier(TierConformance):
    tier_name = "disk"
