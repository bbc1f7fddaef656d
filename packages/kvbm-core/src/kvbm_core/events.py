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


def event_from_wire(wire: dict[str, Any]) -> KvEvent:
    """Parse one wire dict; raises ``ValueError`` on anything that is not a kvbm event."""
    if not isinstance(wire, dict):
        raise ValueError(f"an event must be an object, got {type(wire).__name__}")
    kind = wire.get("type")
    medium = wire.get("medium")
    medium = _FROM_WIRE_MEDIUM.get(medium, str(medium).lower()) if medium is not None else None
    try:
        if kind == "BlockStored":
            return BlockStored(
                medium=medium or "gpu",
                block_hashes=tuple(int(h) for h in wire["block_hashes"]),
                parent_hash=None if wire.get("parent_block_hash") is None else int(wire["parent_block_hash"]),
                token_ids=tuple(int(t) for t in wire["token_ids"]),
                block_size=int(wire["block_size"]),
                lora_name=wire.get("lora_name"),
            )
        if kind == "BlockRemoved":
            return BlockRemoved(medium or "gpu", tuple(int(h) for h in wire["block_hashes"]))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared(medium)
    except (KeyError, TypeError, ValueError) as exc:
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
