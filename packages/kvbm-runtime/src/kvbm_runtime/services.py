"""What the leader and worker cores need from discovery (interface; any process).

A discovery backend's ``DiscoveryBackendSpec.make(config)`` returns a
:class:`~kvbm_discovery.services.DiscoveryServices`, which satisfies :class:`RuntimeServices`
structurally; an engine adapter may hand the cores anything else that does (a test double,
another backend).

Operations the cores use:
- ``discovery.register(info)``: announce this leader or worker rank; the returned registration
  is closed when the core closes.
- ``discovery.wait_for_peers(num_workers)``: the leader's start-up barrier (bounded by
  ``KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``); every registered instance once all are there.
- ``control.leader_inbox()`` / ``control.worker_inbox(rank)``: the inbox of one side, opened
  once by its core.
- ``control.send_to_leader(message)`` / ``control.send_to_worker(rank, message)``: queue a
  control message (:mod:`kvbm_core.messages`); return at once.
- ``make_event_sink(worker_id)``: the leader's KV event sink (only with ``KVBM_EVENTS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kvbm_core.events import EventSink
from kvbm_core.messages import Message
from kvbm_discovery.control import Inbox
from kvbm_discovery.discovery import InstanceInfo, Registration

__all__ = ["RuntimeDiscovery", "RuntimeControl", "RuntimeServices"]


class RuntimeDiscovery(Protocol):
    def register(self, info: InstanceInfo) -> Registration:
        """Announce one instance.

        Args:
            info: the leader's or one worker rank's registration record.

        Returns:
            The registration; closing it withdraws the instance.
        """
        ...

    def wait_for_peers(self, num_workers: int, timeout: float | None = None) -> list[InstanceInfo]:
        """Wait until the leader and ``num_workers`` workers are registered.

        Args:
            num_workers: the worker ranks to wait for.
            timeout: seconds; ``None``: the backend's barrier timeout.

        Returns:
            Every registered instance. Raises ``BarrierTimeoutError`` naming the missing ones.
        """
        ...


class RuntimeControl(Protocol):
    def send_to_leader(self, message: Message) -> None:
        """Queue ``message`` for the leader; returns at once."""
        ...

    def send_to_worker(self, rank: int, message: Message) -> None:
        """Queue ``message`` for worker ``rank``; returns at once."""
        ...

    def leader_inbox(self) -> Inbox:
        """The leader's inbox: every message sent to the leader after it was opened."""
        ...

    def worker_inbox(self, rank: int) -> Inbox:
        """Worker ``rank``'s inbox: every message sent to that rank after it was opened."""
        ...

    @property
    def max_payload_bytes(self) -> int:
        """The largest encoded message that can travel (NATS: the server's ``max_payload``)."""
        ...


@runtime_checkable
class RuntimeServices(Protocol):
    """Discovery, control channel and event sinks, as the cores use them."""

    @property
    def discovery(self) -> RuntimeDiscovery: ...

    @property
    def control(self) -> RuntimeControl: ...

    def make_event_sink(self, worker_id: str = "0", capacity: int = ...) -> EventSink:
        """A sink for this process's KV events.

        Args:
            worker_id: names the publisher (the leader uses ``"leader"``).
            capacity: events buffered before the oldest are dropped.

        Returns:
            The sink; the services close it when they close.
        """
        ...


if TYPE_CHECKING:
    from kvbm_discovery.services import DiscoveryServices

    def _built_in_services_fit(services: DiscoveryServices) -> RuntimeServices:
        return services  # mypy checks that what discovery backends build satisfies the protocol
