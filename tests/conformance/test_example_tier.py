"""The example third-party tier (examples/kvbm-tier-example) passes the tier conformance kit.

It is found only through its ``example`` entry point; on a machine without CUDA the "GPU" pool
is a CPU tensor (the handlers run the same code path with torch CPU tensors).
"""

from kvbm_core.testing import TierConformance


class TestExampleMmapTier(TierConformance):
    tier_name = "mmap"
