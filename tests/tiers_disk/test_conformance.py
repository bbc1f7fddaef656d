"""The disk tier against kvbm_core.testing's conformance kit (loaded through its entry point,
with the real cpu tier it requires)."""

from __future__ import annotations

from kvbm_core.testing import TierConformance


class TestDiskTier(TierConformance):
    tier_name = "disk"
    blocked_plugins = ("example",)
    tier_options = {"disk_io_threads": 4}
