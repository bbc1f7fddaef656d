"""Where kvbm keeps things on the servers: etcd keys and NATS subjects.

- etcd: ``kvbm/<namespace>/instances/leader`` and ``kvbm/<namespace>/instances/worker-<rank>``
  hold an :class:`~kvbm_discovery.discovery.InstanceInfo` as JSON, under the process's lease.
- NATS events: ``kvbm.<namespace>.events.<worker_id>`` (one JSON batch per message).
- NATS control: ``kvbm.<namespace>.control.leader`` (workers -> leader),
  ``kvbm.<namespace>.control.worker.<rank>`` (leader -> one worker) and
  ``kvbm.<namespace>.control.workers`` (leader -> every worker).
"""

from __future__ import annotations

import re

from kvbm_core.config import ConfigError

__all__ = [
    "check_token",
    "instance_prefix",
    "instance_key",
    "events_subject",
    "events_wildcard",
    "leader_subject",
    "worker_subject",
    "broadcast_subject",
]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def check_token(value: str, what: str = "KVBM_NAMESPACE") -> str:
    """A NATS subject token and etcd path segment: letters, digits, ``_`` and ``-`` only."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ConfigError(
            f"{what}={value!r} is invalid: expected letters, digits, '_' or '-' (it becomes a "
            "NATS subject token and an etcd key segment), e.g. kvbm or llama-70b-prod"
        )
    return value


def instance_prefix(namespace: str) -> bytes:
    return f"kvbm/{check_token(namespace)}/instances/".encode()


def instance_key(namespace: str, instance_id: str) -> bytes:
    return instance_prefix(namespace) + instance_id.encode()


def events_subject(namespace: str, worker_id: str) -> str:
    return f"kvbm.{check_token(namespace)}.events.{check_token(worker_id, 'worker_id')}"


def events_wildcard(namespace: str) -> str:
    return f"kvbm.{check_token(namespace)}.events.*"


def leader_subject(namespace: str) -> str:
    return f"kvbm.{check_token(namespace)}.control.leader"


def worker_subject(namespace: str, rank: int) -> str:
    return f"kvbm.{check_token(namespace)}.control.worker.{int(rank)}"


def broadcast_subject(namespace: str) -> str:
    return f"kvbm.{check_token(namespace)}.control.workers"
