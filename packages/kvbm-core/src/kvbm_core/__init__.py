"""kvbm-core: block identity, layouts, tier indexes, the planner, the transfer protocol,
plugin hookspecs and manager, configuration, event and metric models.

Imports no torch, no engine and no server client.
"""

from kvbm_core.config import ConfigError, KvbmConfig
from kvbm_core.hashing import block_hashes, salt_hash
from kvbm_core.hookspecs import hookimpl, hookspec
from kvbm_core.layout import KvLayout, LayoutKind
from kvbm_core.plugins import (
    DiscoveryBackendSpec,
    PluginLoadError,
    PluginNotFoundError,
    TierContext,
    TierSpec,
    get_plugin_manager,
    load_discovery_backend,
    load_tier_specs,
)
from kvbm_core.transfer import (
    CPU,
    DISK,
    GPU,
    DevicePool,
    JobResult,
    Storage,
    TransferEngine,
    TransferHandler,
    TransferJob,
)

__all__ = [
    "CPU",
    "DISK",
    "GPU",
    "ConfigError",
    "DevicePool",
    "DiscoveryBackendSpec",
    "JobResult",
    "KvLayout",
    "KvbmConfig",
    "LayoutKind",
    "PluginLoadError",
    "PluginNotFoundError",
    "Storage",
    "TierContext",
    "TierSpec",
    "TransferEngine",
    "TransferHandler",
    "TransferJob",
    "block_hashes",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "load_discovery_backend",
    "load_tier_specs",
    "salt_hash",
]
__version__ = "0.1.0"
