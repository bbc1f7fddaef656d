"""An example third-party kvbm tier: KV blocks in a memory-mapped file.

Nothing in kvbm names this package; kvbm finds it through the ``example`` entry point of group
``kvbm`` (see ``pyproject.toml``). It contributes one tier, ``mmap`` (medium ``mmap``, level 4),
with GPU <-> mmap handlers.
"""

from kvbm_tier_example.plugin import MEDIUM, TIER_NAME

__all__ = ["MEDIUM", "TIER_NAME"]
