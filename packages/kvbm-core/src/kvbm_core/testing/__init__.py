"""Test kit for kvbm tier plugins (needs pytest and torch; imports torch only when a test runs).

``TierConformance`` is a base class of pytest checks: subclass it, set ``tier_name`` to the name
your plugin's ``TierSpec`` carries, and run pytest::

    from kvbm_core.testing import TierConformance

    class TestMmapTier(TierConformance):
        tier_name = "mmap"

The tier is loaded the way kvbm loads it (the entry points of group ``kvbm``), so install your
distribution first. ``build_tier_rig`` and the byte helpers are public for plugin-specific tests.
"""

from kvbm_core.testing.conformance import TierConformance
from kvbm_core.testing.rig import (
    TierRig,
    build_tier_rig,
    default_device,
    is_host_addressable,
    make_device_pool,
    read_blocks,
    run_jobs,
    write_blocks,
)

__all__ = [
    "TierConformance",
    "TierRig",
    "build_tier_rig",
    "default_device",
    "is_host_addressable",
    "make_device_pool",
    "read_blocks",
    "run_jobs",
    "write_blocks",
]
