"""kvbm-tiers-cpu: the G2 tier (pinned host memory) and its GPU<->host transfer handlers.

Found by kvbm through the ``cpu`` entry point of group ``kvbm`` (:mod:`kvbm_tiers_cpu.plugin`).
"""

from kvbm_tiers_cpu.handlers import DEFAULT_STAGING_BYTES, GpuToHostHandler, HostToGpuHandler
from kvbm_tiers_cpu.storage import HostMemoryError, PinnedHostStorage

__all__ = [
    "DEFAULT_STAGING_BYTES",
    "GpuToHostHandler",
    "HostMemoryError",
    "HostToGpuHandler",
    "PinnedHostStorage",
]
__version__ = "0.1.0"
