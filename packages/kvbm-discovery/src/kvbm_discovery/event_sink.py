"""KV event sinks (interface and the bounded buffer every sink shares).

Which process: the leader publishes ``kvbm_core.events`` (``BlockStored``, ``BlockRemoved``,
``AllBlocksCleared``) from the engine thread as blocks enter and leave tiers.

Operations of a sink (``kvbm_core.events.EventSink``):
- ``publish(events)``: append the batch to a bounded buffer and return. Never blocks, never
  does I/O, never raises on a full buffer: events that do not fit are dropped and counted in
  ``num_dropped``.
- ``close()``: deliver what is buffered if the server is reachable (bounded wait), then stop;
  idempotent. Events still buffered then are counted as dropped.
- ``stats()``: ``num_published`` (accepted), ``num_sent`` (delivered to the transport),
  ``num_dropped`` and ``num_buffered``.

Wire form of one batch (``encode_batch`` / ``decode_batch``): JSON
``{"kvbm": 1, "namespace": ..., "worker_id": ..., "seq": n, "events": [event.to_wire()...]}``;
``seq`` counts batches per sink so a reader can see gaps.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvbm_core.events import KvEvent, event_from_wire
from kvbm_discovery.errors import MessageError

__all__ = ["BufferedEventSink", "EventBatch", "SinkStats", "encode_batch", "decode_batch"]

DEFAULT_CAPACITY = 65536


@dataclass(frozen=True)
class SinkStats:
    num_published: int
    num_sent: int
    num_dropped: int
    num_buffered: int


@dataclass(frozen=True)
class EventBatch:
    namespace: str
    worker_id: str
    seq: int
    events: tuple[KvEvent, ...]


def encode_batch(namespace: str, worker_id: str, seq: int, events: Sequence[KvEvent]) -> bytes:
    return json.dumps(
        {
            "kvbm": 1,
            "namespace": namespace,
            "worker_id": worker_id,
            "seq": seq,
            "events": [e.to_wire() for e in events],
        }
    ).encode()


def decode_batch(data: bytes | str) -> EventBatch:
    """Parse one batch; raises :class:`MessageError` on anything that is not one."""
    try:
        wire: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"event batch is not JSON: {exc}") from None
    if not isinstance(wire, dict) or wire.get("kvbm") != 1:
        raise MessageError("not a kvbm v1 event batch")
    namespace, worker, seq, events = (wire.get(k) for k in ("namespace", "worker_id", "seq", "events"))
    if not isinstance(namespace, str) or not isinstance(worker, str):
        raise MessageError("event batch needs string 'namespace' and 'worker_id'")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(events, list):
        raise MessageError("event batch needs an integer 'seq' >= 0 and an 'events' list")
    try:
        parsed = tuple(event_from_wire(e) for e in events)
    except ValueError as exc:
        raise MessageError(f"event batch holds a bad event: {exc}") from None
    return EventBatch(namespace, worker, seq, parsed)


class BufferedEventSink:
    """The bounded, lock-protected buffer behind every sink; ``take`` is the sender's side."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"event buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._buffer: deque[KvEvent] = deque()
        self._num_published = 0
        self._num_sent = 0
        self._num_dropped = 0
        self._is_closed = False

    def publish(self, events: Sequence[KvEvent]) -> None:
        with self._lock:
            if self._is_closed:
                self._num_dropped += len(events)
                return
            room = self.capacity - len(self._buffer)
            accepted = events if len(events) <= room else events[:room]
            self._buffer.extend(accepted)
            self._num_published += len(accepted)
            self._num_dropped += len(events) - len(accepted)

    def take(self, max_events: int) -> list[KvEvent]:
        with self._lock:
            count = min(max_events, len(self._buffer))
            return [self._buffer.popleft() for _ in range(count)]

    def _mark_sent(self, count: int) -> None:
        with self._lock:
            self._num_sent += count

    def _mark_dropped(self, count: int) -> None:
        with self._lock:
            self._num_dropped += count

    def _close_buffer(self) -> None:
        with self._lock:
            self._is_closed = True
            self._num_dropped += len(self._buffer)
            self._buffer.clear()

    def close(self) -> None:
        """Stop accepting events; what is still buffered counts as dropped."""
        self._close_buffer()

    @property
    def num_dropped(self) -> int:
        return self._num_dropped

    def stats(self) -> SinkStats:
        with self._lock:
            return SinkStats(self._num_published, self._num_sent, self._num_dropped, len(self._buffer))
