"""The built-in "cpu" tier (kvbm-tiers-cpu) passes the tier conformance kit.

Loaded through its entry point like any third-party tier; on a machine without CUDA the GPU
pool is a CPU tensor.
"""

from importlib.metadata import entry_points
from importlib.util import find_spec

import pytest

from kvbm_core.testing import TierConformance

_PLUGIN = next((ep.value for ep in entry_points(group="kvbm") if ep.name == "cpu"), None)
if _PLUGIN is None or find_spec(_PLUGIN.split(":")[0]) is None:
    pytest.skip(
        f"kvbm-tiers-cpu is not installed (entry point 'cpu' -> {_PLUGIN} not importable)",
        allow_module_level=True,
    )


class TestBuiltinTier(TierConformance):
    tier_name = "cpu"
