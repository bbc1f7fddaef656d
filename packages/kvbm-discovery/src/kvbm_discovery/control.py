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
- ``close()``: stop delivering and free resources; idempotent.

Backends: in-process (all ranks share a process) and NATS (``nats_control``). Received bytes
that do not decode as a kvbm message are ignored with a warning and counted in
``num_malformed``; nothing a peer sends can crash the receiver.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod

from kvbm_discovery.messages import Message

__all__ = ["Inbox", "ControlChannel"]


class Inbox:
    """A thread-safe FIFO of received messages."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def put(self, message: Message) -> None:
        self._queue.put(message)

    def poll(self) -> list[Message]:
        """Every message received so far and not yet taken; never blocks."""
        messages = []
        while True:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                return messages

    def get(self, timeout: float) -> Message | None:
        """The next message, or ``None`` after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class ControlChannel(ABC):
    num_malformed: int = 0

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
