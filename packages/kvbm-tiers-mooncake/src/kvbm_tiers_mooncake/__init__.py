"""kvbm's G4 tier: KV blocks shared across engine instances through Mooncake Store.

Entry point ``mooncake`` (group ``kvbm``); see the package README for deployment.
"""

from kvbm_tiers_mooncake.keys import KeyScheme
from kvbm_tiers_mooncake.value_format import (
    HEADER_BYTES,
    CorruptValueError,
    check_value,
    pack_header,
)

__all__ = ["KeyScheme", "HEADER_BYTES", "CorruptValueError", "check_value", "pack_header", "MEDIUM"]

MEDIUM = "mooncake"
