"""Discovery: who is here (interface).

Every kvbm process uses one ``Discovery`` (the leader inside TensorRT-LLM's scheduler, each
worker rank inside its worker); a process hosting both registers twice on the same object.

Operations:
- ``register(info) -> Registration``: announce an instance (the leader, or a worker rank)
  with its metadata under the namespace. The registration lives as long as the process: on
  etcd it hangs on a lease kept alive in the background, so it lapses within the lease TTL
  when the process dies. A second live holder of the same instance id raises
  :class:`DuplicateInstanceError` naming the holder. ``Registration.close()`` withdraws it.
- ``list_instances()``: the instances registered now (this process's view, kept current by
  a watch); ``get(instance_id)``: one of them or ``None``.
- ``watch(callback) -> unsubscribe``: ``callback(MembershipEvent)`` for every instance that
  appears, changes or disappears; the current members are replayed as ``added`` first.
  Callbacks run on the thread that observed the change (the etcd loop thread, or the
  registering thread in-process) and must return quickly; an exception in one is
  logged and does not stop the others.
- ``wait_for_peers(num_workers, timeout=None)``: the barrier "the leader and workers
  ``0..num_workers-1`` are here"; returns their infos, or raises
  :class:`BarrierTimeoutError` naming who is missing after ``timeout`` (default
  ``KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``).
- ``wait_until_gone(instance_id, timeout)``: ``True`` once the instance is not registered.
- ``close()``: withdraw this process's registrations and stop background work; idempotent.

Registry values that are not valid ``InstanceInfo`` JSON (foreign or malformed keys under our
prefix, values over ``MAX_INFO_BYTES`` or nested deeper than ``MAX_DEPTH``; on etcd also
values not signed with the deployment secret or not held under a lease) are ignored with a
rate-limited warning and counted in ``num_ignored``.

``sender_id``: this process's incarnation id (see :mod:`kvbm_discovery.envelope`); ``register``
stamps it on the ``InstanceInfo`` as ``sender``, so receivers of control messages can check
that a message claiming an instance comes from the process that registered it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvbm_core.layout import KvLayout
from kvbm_discovery.bounded_json import MAX_DEPTH, loads_bounded
from kvbm_discovery.bounded_log import RateLimitedLog, clip
from kvbm_discovery.envelope import new_sender_id
from kvbm_discovery.errors import BarrierTimeoutError, MessageError

__all__ = [
    "LEADER",
    "WORKER",
    "InstanceInfo",
    "MembershipEvent",
    "Registration",
    "Discovery",
    "leader_id",
    "worker_id",
]

log = logging.getLogger(__name__)

LEADER = "leader"
WORKER = "worker"
_VERSION = "0.1.0"
MAX_INFO_BYTES = 64 * 1024


def leader_id() -> str:
    return LEADER


def worker_id(rank: int) -> str:
    return f"{WORKER}-{int(rank)}"


@dataclass(frozen=True)
class InstanceInfo:
    """What one instance announces: role, rank, where it runs and what its blocks look like."""

    role: str
    rank: int = 0
    world_size: int = 1
    bytes_per_block: int = 0
    layout: KvLayout | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    version: str = _VERSION
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Who registered it (the registering process's sender id); not part of the JSON: on etcd
    # it comes from the signed envelope around it.
    sender: str = ""

    def __post_init__(self) -> None:
        if self.role not in (LEADER, WORKER):
            raise ValueError(f"InstanceInfo.role must be {LEADER!r} or {WORKER!r}, got {self.role!r}")
        if self.rank < 0 or self.world_size < 1 or self.bytes_per_block < 0:
            raise ValueError(
                f"InstanceInfo: rank {self.rank} must be >= 0, world_size {self.world_size} >= 1, "
                f"bytes_per_block {self.bytes_per_block} >= 0"
            )

    @property
    def instance_id(self) -> str:
        return leader_id() if self.role == LEADER else worker_id(self.rank)

    def to_json(self) -> bytes:
        layout = None
        if self.layout is not None:
            layout = {
                "num_layers": self.layout.num_layers,
                "tokens_per_block": self.layout.tokens_per_block,
                "num_kv_heads": self.layout.num_kv_heads,
                "head_dim": self.layout.head_dim,
                "dtype": self.layout.dtype,
                "kv_factor": self.layout.kv_factor,
                "kind": self.layout.kind.value,
            }
        return json.dumps(
            {
                "kvbm": 1,
                "role": self.role,
                "rank": self.rank,
                "world_size": self.world_size,
                "bytes_per_block": self.bytes_per_block,
                "layout": layout,
                "host": self.host,
                "pid": self.pid,
                "version": self.version,
                "metadata": dict(self.metadata),
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> InstanceInfo:
        """Parse and validate; raises :class:`MessageError` on anything else."""
        wire = loads_bounded(data, "instance info", MAX_INFO_BYTES, MAX_DEPTH)
        if not isinstance(wire, dict) or wire.get("kvbm") != 1:
            raise MessageError("instance info is not a kvbm (version 1) object")
        try:
            layout = wire.get("layout")
            metadata = wire.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise TypeError("metadata must be an object")
            return cls(
                role=_typed(wire["role"], str, "role"),
                rank=_typed(wire["rank"], int, "rank"),
                world_size=_typed(wire["world_size"], int, "world_size"),
                bytes_per_block=_typed(wire["bytes_per_block"], int, "bytes_per_block"),
                layout=None if layout is None else KvLayout(**layout),
                host=_typed(wire["host"], str, "host"),
                pid=_typed(wire["pid"], int, "pid"),
                version=_typed(wire["version"], str, "version"),
                metadata={str(k): str(v) for k, v in metadata.items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"invalid instance info: {clip(repr(exc), 300)}") from None

    def describe(self) -> str:
        return f"{self.instance_id} (pid {self.pid} on {self.host})"


def _typed(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class MembershipEvent:
    kind: str  # "added", "updated" or "removed"
    instance_id: str
    info: InstanceInfo | None


class Registration:
    """A handle on one registered instance; ``close()`` withdraws it (idempotent)."""

    def __init__(self, info: InstanceInfo, release: Callable[[str], None]) -> None:
        self.info = info
        self._release = release
        self.is_closed = False

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            self._release(self.instance_id)


class _Barrier:
    def __init__(self, wanted: list[str]) -> None:
        self.wanted = wanted
        self.result: list[InstanceInfo] | None = None

    def check(self, members: Mapping[str, InstanceInfo]) -> None:
        if self.result is None and all(i in members for i in self.wanted):
            self.result = [members[i] for i in self.wanted]


class Discovery(ABC):
    """Base of every backend: a thread-safe membership view fed by ``_apply``/``_replace_all``."""

    def __init__(self, namespace: str, barrier_timeout_secs: float, sender_id: str | None = None) -> None:
        self.namespace = namespace
        self.barrier_timeout_secs = barrier_timeout_secs
        self.sender_id = sender_id or new_sender_id()
        self.num_ignored = 0
        self._ignored_log = RateLimitedLog(log)
        self._cond = threading.Condition()
        self._members: dict[str, InstanceInfo] = {}
        self._watchers: list[Callable[[MembershipEvent], None]] = []
        self._barriers: list[_Barrier] = []

    # -- backend side -----------------------------------------------------------------------

    @abstractmethod
    def register(self, info: InstanceInfo) -> Registration: ...

    @abstractmethod
    def close(self) -> None: ...

    def _apply(self, instance_id: str, info: InstanceInfo | None) -> None:
        """Record that ``instance_id`` now holds ``info`` (``None``: it is gone)."""
        with self._cond:
            before = self._members.get(instance_id)
            if info is None:
                if before is None:
                    return
                del self._members[instance_id]
                event = MembershipEvent("removed", instance_id, before)
            else:
                if before == info:
                    return
                self._members[instance_id] = info
                event = MembershipEvent("added" if before is None else "updated", instance_id, info)
            for barrier in self._barriers:
                barrier.check(self._members)
            self._cond.notify_all()
            watchers = list(self._watchers)
        for callback in watchers:
            self._notify(callback, event)

    def _replace_all(self, members: Mapping[str, InstanceInfo]) -> None:
        """Resynchronise with a full snapshot (after a reconnect)."""
        with self._cond:
            gone = [i for i in self._members if i not in members]
        for instance_id in gone:
            self._apply(instance_id, None)
        for instance_id, info in members.items():
            self._apply(instance_id, info)

    def _stamped(self, info: InstanceInfo) -> InstanceInfo:
        return replace(info, sender=self.sender_id)

    def _ignore(self, where: str, problem: Exception | str) -> None:
        self.num_ignored += 1
        self._ignored_log.warning(
            clip(where, 200), "kvbm discovery: ignoring %s: %s", clip(where, 200), clip(str(problem), 300)
        )

    @staticmethod
    def _notify(callback: Callable[[MembershipEvent], None], event: MembershipEvent) -> None:
        try:
            callback(event)
        except Exception:  # a watcher's bug must not stop discovery
            log.exception("kvbm discovery: watch callback %r failed", callback)

    # -- user side --------------------------------------------------------------------------

    def list_instances(self) -> list[InstanceInfo]:
        with self._cond:
            return sorted(self._members.values(), key=lambda i: (i.role != LEADER, i.rank))

    def get(self, instance_id: str) -> InstanceInfo | None:
        with self._cond:
            return self._members.get(instance_id)

    def watch(self, callback: Callable[[MembershipEvent], None]) -> Callable[[], None]:
        with self._cond:
            self._watchers.append(callback)
            current = list(self._members.items())
        for instance_id, info in current:
            self._notify(callback, MembershipEvent("added", instance_id, info))

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._watchers:
                    self._watchers.remove(callback)

        return unsubscribe

    def wait_for_peers(self, num_workers: int, timeout: float | None = None) -> list[InstanceInfo]:
        """Block until the leader and workers ``0..num_workers-1`` are registered.

        Checked on every membership change, not only when this thread wakes up, so a peer
        that leaves right after everyone arrived does not hold back a slower waiter.
        """
        timeout = self.barrier_timeout_secs if timeout is None else timeout
        barrier = _Barrier([leader_id()] + [worker_id(r) for r in range(num_workers)])
        deadline = time.monotonic() + timeout
        with self._cond:
            barrier.check(self._members)
            self._barriers.append(barrier)
            try:
                while barrier.result is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        present = [i for i in barrier.wanted if i in self._members]
                        missing = [i for i in barrier.wanted if i not in self._members]
                        raise BarrierTimeoutError(timeout, missing, present)
                    self._cond.wait(min(left, 0.5))
                return barrier.result
            finally:
                self._barriers.remove(barrier)

    def wait_until_gone(self, instance_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while instance_id in self._members:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def __enter__(self) -> Discovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
