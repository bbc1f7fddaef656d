"""Control channel between the leader and its workers (interface).

Which process: the leader opens ``leader_inbox()`` once; each worker rank opens
``worker_inbox(rank)`` once. Any process may send.

Operations:
- ``send_to_leader(message)`` (workers): queue a :mod:`~kvbm_discovery.messages` message for
  the leader (``Completions``, ``WorkerError``). Returns at once; never blocks on I/O.
- ``send_to_worker(rank, message)`` / ``broadcast(message)`` (leader): queue a message for
  one worker or for all (``TierSizes``). Returns at once.
- ``leader_inbox()`` / ``worker_inbox(rank)``: an :class:`Inbox` receiving, in order per
  sender, every message sent to that side after the inbox was opened.
- ``max_payload_bytes``: the largest encoded message that can travel (NATS: the server's
  ``max_payload``, at most ``MAX_MESSAGE_BYTES``); bigger payloads go in parts
  (:mod:`kvbm_discovery.restore_sender`).
- ``close()``: stop delivering and free resources; idempotent.

Backends: in-process (all ranks share a process) and NATS (``nats_control``). Received bytes
that do not decode as a kvbm message are ignored with a warning and counted in
``num_malformed``; nothing a peer sends can crash the receiver. Over NATS every message is
also signed and checked against the sender's registration (:mod:`kvbm_discovery.admission`).

An :class:`Inbox` is bounded (``max_messages`` and ``max_bytes`` of payload): a message that
does not fit is refused (``put`` returns ``False``; NATS leaves it unacknowledged, so its
sender retries later) and counted in ``num_dropped``. Messages refused by the admission
checks are counted on the inbox they were meant for (``num_rejected``), and
``take_tallies()`` hands both to the owner's metrics.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

from kvbm_core.messages import Message
from kvbm_discovery.messages import MAX_MESSAGE_BYTES

__all__ = ["Inbox", "InboxTally", "ControlChannel"]

DEFAULT_MAX_MESSAGES = 4096
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class InboxTally:
    num_rejected: int = 0
    num_dropped: int = 0


class Inbox:
    """A thread-safe, bounded FIFO of received messages."""

    def __init__(self, max_messages: int = DEFAULT_MAX_MESSAGES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.num_dropped = 0
        self.num_rejected = 0
        self._tallied = InboxTally()
        self._cond = threading.Condition()
        self._queue: deque[tuple[Message, int]] = deque()
        self._num_bytes = 0

    def put(self, message: Message, size: int = 0) -> bool:
        """Queue ``message`` (``size``: its bytes on the wire); ``False`` when it does not fit."""
        with self._cond:
            if len(self._queue) >= self.max_messages or self._num_bytes + size > self.max_bytes:
                self.num_dropped += 1
                return False
            self._queue.append((message, size))
            self._num_bytes += size
            self._cond.notify()
            return True

    def count_rejected(self) -> None:
        with self._cond:
            self.num_rejected += 1

    def take_tallies(self) -> InboxTally:
        """Rejected and dropped messages since the last call."""
        with self._cond:
            now = InboxTally(self.num_rejected, self.num_dropped)
            since = InboxTally(now.num_rejected - self._tallied.num_rejected,
                               now.num_dropped - self._tallied.num_dropped)
            self._tallied = now
            return since

    def _pop(self) -> Message:
        message, size = self._queue.popleft()
        self._num_bytes -= size
        return message

    def poll(self) -> list[Message]:
        """Every message received so far and not yet taken; never blocks."""
        with self._cond:
            return [self._pop() for _ in range(len(self._queue))]

    def get(self, timeout: float) -> Message | None:
        """The next message, or ``None`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._pop()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)


class ControlChannel(ABC):
    num_malformed: int = 0

    @property
    def max_payload_bytes(self) -> int:
        """The largest encoded message this channel carries (in-process: the decoder's bound)."""
        return MAX_MESSAGE_BYTES

    @abstractmethod
    def send_to_leader(self, message: Message) -> None: ...

    @abstractmethod
    def send_to_worker(self, rank: int, message: Message) -> None: ...

    @abstractmethod
    def broadcast(self, message: Message) -> None: ...

    @abstractmethod
    def leader_inbox(self) -> Inbox: ...

    @abstractmethod
    def worker_inbox(self, rank: int) -> Inbox: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ControlChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
