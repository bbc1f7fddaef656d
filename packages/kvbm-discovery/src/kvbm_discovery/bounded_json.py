"""JSON from peers and from etcd, parsed with bounds (any process that receives).

``loads_bounded(data, what, max_bytes, max_depth)``: the parsed value, or
:class:`MessageError` naming ``what`` for anything too large, nested too deep or not JSON.
The size is checked before parsing and the depth right after, so a hostile payload costs at
most one bounded parse: never a ``RecursionError``, never an allocation beyond ``max_bytes``.
"""

from __future__ import annotations

import json
from typing import Any

from kvbm_discovery.errors import MessageError

__all__ = ["MAX_DEPTH", "loads_bounded"]

# kvbm's own messages nest four levels (message, list, result, list); leave some room.
MAX_DEPTH = 8


def loads_bounded(data: bytes | str, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    if len(data) > max_bytes:
        raise MessageError(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        value = json.loads(data)
    except RecursionError:  # the C scanner recurses per level: refuse before it gets deep
        raise MessageError(f"{what} nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{what} is not JSON: {str(exc)[:200]}") from None
    if _depth_exceeds(value, max_depth):
        raise MessageError(f"{what} nests deeper than {max_depth} levels")
    return value


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """Iterative, so checking a deep value cannot itself recurse."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
