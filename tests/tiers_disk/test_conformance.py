"""The disk tier against kvbm_core.testing's conformance kit (loaded through its entry point,
with the real cpu tier it requires; skipped where kvbm-tiers-cpu is not installed, as when
this package's tests run with only its own dependencies)."""

from __future__ import annotations

import importlib.util

import pytest

from kvbm_core.testing import TierConformance

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("kvbm_tiers_cpu") is None,
    reason="the disk tier's handlers need the cpu tier (kvbm-tiers-cpu) installed",
)


class TestDiskTier(TierConformance):
    tier_name = "disk"
    blocked_plugins = ("example",)
    tier_options = {"disk_io_threads": 4, "disk_backend": "threads"}
