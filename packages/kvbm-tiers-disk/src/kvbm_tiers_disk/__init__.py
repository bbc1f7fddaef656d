"""kvbm-tiers-disk: the G3 tier (local disk) of kvbm.

Public surface: ``DiskStorage`` (one rank's slots file and persistent index), the transfer
handlers (``HostToDiskHandler``, ``DiskToHostHandler``, ``GpuToDiskHandler``,
``DiskToGpuHandler``), their NIXL variants for host <-> disk (``NixlHostToDiskHandler``,
``NixlDiskToHostHandler``; need a NIXL wheel only when constructed) and ``DiskBlockError``. The plugin module ``kvbm_tiers_disk.plugin`` is
what kvbm loads through the ``kvbm`` entry point.
"""

from kvbm_tiers_disk.handlers import (
    DiskToGpuHandler,
    DiskToHostHandler,
    GpuToDiskHandler,
    HostToDiskHandler,
)
from kvbm_tiers_disk.nixl_handlers import NixlDiskToHostHandler, NixlHostToDiskHandler
from kvbm_tiers_disk.storage import DiskBlockError, DiskStorage

__all__ = [
    "DiskBlockError",
    "DiskStorage",
    "DiskToGpuHandler",
    "DiskToHostHandler",
    "GpuToDiskHandler",
    "HostToDiskHandler",
    "NixlDiskToHostHandler",
    "NixlHostToDiskHandler",
]
__version__ = "0.1.0"
