"""The in-process backend (the default; no servers): registry, barrier, control channel and
event sink shared by every thread of one process, per namespace.

Objects created with the same namespace anywhere in the process see each other, so a leader
and workers that run as threads of one process meet exactly as they would through etcd/NATS.
"""

from __future__ import annotations

import threading

from kvbm_core.events import KvEvent
from kvbm_core.messages import Message
from kvbm_discovery.control import ControlChannel, Inbox
from kvbm_discovery.discovery import Discovery, InstanceInfo, Registration
from kvbm_discovery.errors import DuplicateInstanceError
from kvbm_discovery.event_sink import DEFAULT_CAPACITY, BufferedEventSink

__all__ = ["InProcDiscovery", "InProcControlChannel", "InProcEventSink", "reset_inproc"]


class _Hub:
    """Everything one namespace shares inside the process."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.members: dict[str, tuple[InstanceInfo, InProcDiscovery]] = {}
        self.views: list[InProcDiscovery] = []
        self.leader_inboxes: list[Inbox] = []
        self.worker_inboxes: dict[int, list[Inbox]] = {}


_HUBS: dict[str, _Hub] = {}
_HUBS_LOCK = threading.Lock()


def _hub(namespace: str) -> _Hub:
    with _HUBS_LOCK:
        return _HUBS.setdefault(namespace, _Hub())


def reset_inproc(namespace: str | None = None) -> None:
    """Forget one namespace's (or every) in-process state; for tests."""
    with _HUBS_LOCK:
        if namespace is None:
            _HUBS.clear()
        else:
            _HUBS.pop(namespace, None)


class InProcDiscovery(Discovery):
    def __init__(self, namespace: str = "kvbm", barrier_timeout_secs: float = 1800.0) -> None:
        super().__init__(namespace, barrier_timeout_secs)
        self._hub = _hub(namespace)
        self._is_closed = False
        with self._hub.lock:
            self._hub.views.append(self)
            self._replace_all({i: info for i, (info, _) in self._hub.members.items()})

    def register(self, info: InstanceInfo) -> Registration:
        info = self._stamped(info)
        with self._hub.lock:
            if self._is_closed:
                raise RuntimeError("register() on a closed InProcDiscovery")
            held = self._hub.members.get(info.instance_id)
            if held is not None and held[1] is not self:
                raise DuplicateInstanceError(
                    f"{info.instance_id} is already registered in namespace {self.namespace!r} "
                    f"by {held[0].describe()}; give each rank its own rank number"
                )
            self._hub.members[info.instance_id] = (info, self)
            self._broadcast(info.instance_id, info)
        return Registration(info, self._release)

    def _release(self, instance_id: str) -> None:
        with self._hub.lock:
            held = self._hub.members.get(instance_id)
            if held is not None and held[1] is self:
                del self._hub.members[instance_id]
                self._broadcast(instance_id, None)

    def _broadcast(self, instance_id: str, info: InstanceInfo | None) -> None:
        for view in list(self._hub.views):
            view._apply(instance_id, info)

    def close(self) -> None:
        with self._hub.lock:
            if self._is_closed:
                return
            mine = [i for i, (_, owner) in self._hub.members.items() if owner is self]
            for instance_id in mine:
                self._release(instance_id)
            self._hub.views.remove(self)
            self._is_closed = True


class InProcControlChannel(ControlChannel):
    def __init__(self, namespace: str = "kvbm") -> None:
        self.namespace = namespace
        self._hub = _hub(namespace)
        self._opened: list[Inbox] = []

    def send_to_leader(self, message: Message) -> None:
        with self._hub.lock:
            inboxes = list(self._hub.leader_inboxes)
        for inbox in inboxes:
            inbox.put(message)

    def send_to_worker(self, rank: int, message: Message) -> None:
        with self._hub.lock:
            inboxes = list(self._hub.worker_inboxes.get(rank, ()))
        for inbox in inboxes:
            inbox.put(message)

    def broadcast(self, message: Message) -> None:
        with self._hub.lock:
            inboxes = [i for per_rank in self._hub.worker_inboxes.values() for i in per_rank]
        for inbox in inboxes:
            inbox.put(message)

    def leader_inbox(self) -> Inbox:
        inbox = Inbox()
        with self._hub.lock:
            self._hub.leader_inboxes.append(inbox)
        self._opened.append(inbox)
        return inbox

    def worker_inbox(self, rank: int) -> Inbox:
        inbox = Inbox()
        with self._hub.lock:
            self._hub.worker_inboxes.setdefault(rank, []).append(inbox)
        self._opened.append(inbox)
        return inbox

    def close(self) -> None:
        with self._hub.lock:
            if self._opened:
                opened = {id(i) for i in self._opened}
                self._hub.leader_inboxes[:] = [i for i in self._hub.leader_inboxes if id(i) not in opened]
                for per_rank in self._hub.worker_inboxes.values():
                    per_rank[:] = [i for i in per_rank if id(i) not in opened]
            self._opened.clear()


class InProcEventSink(BufferedEventSink):
    """Keeps events in a bounded buffer until an in-process consumer ``drain()``s them."""

    def __init__(self, worker_id: str = "0", capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(capacity)
        self.worker_id = worker_id

    def drain(self, max_events: int | None = None) -> list[KvEvent]:
        events = self.take(self.capacity if max_events is None else max_events)
        self._mark_sent(len(events))
        return events
