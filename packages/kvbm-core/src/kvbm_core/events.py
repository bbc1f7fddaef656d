"""KV events: what enters and leaves a tier, for routers and operators.

Produced by the leader as blocks become readable in a tier (``BlockStored``) or are evicted or
dropped (``BlockRemoved``), and when a tier is wiped (``AllBlocksCleared``). Sinks (NATS, a
list for tests) live elsewhere; they take batches and must never block the caller.

``to_wire()`` gives Dynamo's event dict (``type``, ``block_hashes``, ``parent_block_hash``,
``token_ids``, ``block_size``, ``lora_name``, ``medium``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = [
    "BlockStored",
    "BlockRemoved",
    "AllBlocksCleared",
    "KvEvent",
    "EventSink",
    "ListSink",
    "event_from_wire",
]

MEDIUM_NAMES = {"gpu": "GPU", "cpu": "CPU_TIER1", "disk": "CPU_TIER2"}


def _wire_medium(medium: str) -> str:
    return MEDIUM_NAMES.get(medium, medium.upper())


@dataclass(frozen=True, slots=True)
class BlockStored:
    medium: str
    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "BlockStored",
            "block_hashes": list(self.block_hashes),
            "parent_block_hash": self.parent_hash,
            "token_ids": list(self.token_ids),
            "block_size": self.block_size,
            "lora_name": self.lora_name,
            "medium": _wire_medium(self.medium),
        }


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    medium: str
    block_hashes: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "BlockRemoved",
            "block_hashes": list(self.block_hashes),
            "medium": _wire_medium(self.medium),
        }


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": "AllBlocksCleared"}
        if self.medium is not None:
            wire["medium"] = _wire_medium(self.medium)
        return wire


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared
_FROM_WIRE_MEDIUM = {v: k for k, v in MEDIUM_NAMES.items()}
_U64 = 2**64
_U32 = 2**32


def _ints(wire: dict[str, Any], key: str, upper: int) -> tuple[int, ...]:
    # A string is iterable too: "123" must not become (1, 2, 3).
    values = wire[key]
    if not isinstance(values, list | tuple):
        raise TypeError(f"{key} must be a list, got {type(values).__name__}")
    return tuple(_int(key, v, upper) for v in values)


def _int(key: str, value: Any, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < upper:
        raise ValueError(f"{key} holds {value!r}, expected integers in 0..{upper - 1}")
    return value


def _medium(wire: dict[str, Any]) -> str | None:
    medium = wire.get("medium")
    if medium is None:
        return None
    if not isinstance(medium, str) or not medium:
        raise ValueError(f"medium must be a tier name such as CPU_TIER1, got {medium!r}")
    return _FROM_WIRE_MEDIUM.get(medium, medium.lower())


def _block_stored(wire: dict[str, Any], medium: str) -> BlockStored:
    parent = wire.get("parent_block_hash")
    lora_name = wire.get("lora_name")
    if lora_name is not None and not isinstance(lora_name, str):
        raise TypeError(f"lora_name must be a string or null, got {lora_name!r}")
    block_size = _int("block_size", wire["block_size"], _U32)
    if block_size == 0:
        raise ValueError("block_size must be > 0")
    return BlockStored(
        medium=medium,
        block_hashes=_ints(wire, "block_hashes", _U64),
        parent_hash=None if parent is None else _int("parent_block_hash", parent, _U64),
        token_ids=_ints(wire, "token_ids", _U32),
        block_size=block_size,
        lora_name=lora_name,
    )


def event_from_wire(wire: dict[str, Any]) -> KvEvent:
    """Parse one wire dict; raises ``ValueError`` on anything that is not a kvbm event."""
    if not isinstance(wire, dict):
        raise ValueError(f"an event must be an object, got {type(wire).__name__}")
    kind = wire.get("type")
    try:
        medium = _medium(wire)
        if kind == "BlockStored":
            return _block_stored(wire, medium or "gpu")
        if kind == "BlockRemoved":
            return BlockRemoved(medium or "gpu", _ints(wire, "block_hashes", _U64))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared(medium)
    except KeyError as exc:
        raise ValueError(f"malformed {kind} event: missing {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed {kind} event: {exc}") from None
    raise ValueError(f"unknown event type {kind!r}")


class EventSink(Protocol):
    def publish(self, events: Sequence[KvEvent]) -> None:
        """Queue a batch; must not block the caller on I/O."""

    def close(self) -> None: ...


class ListSink:
    """Keeps every event in memory (tests, the reference executor)."""

    def __init__(self) -> None:
        self.events: list[KvEvent] = []

    def publish(self, events: Sequence[KvEvent]) -> None:
        self.events.extend(events)

    def close(self) -> None:
        pass

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.events]
