"""Errors raised by kvbm-discovery (every one names what failed and how to fix it)."""

from __future__ import annotations

__all__ = [
    "DiscoveryError",
    "ServiceUnavailableError",
    "BarrierTimeoutError",
    "DuplicateInstanceError",
    "MessageError",
]


class DiscoveryError(RuntimeError):
    pass


class ServiceUnavailableError(DiscoveryError):
    """etcd or NATS did not answer at ``endpoint`` within the start-up timeout."""

    def __init__(self, service: str, endpoint: str, detail: str, hint: str = "") -> None:
        self.service = service
        self.endpoint = endpoint
        message = f"{service} is not reachable at {endpoint}: {detail}"
        super().__init__(f"{message}. {hint}".rstrip(". ") if hint else message)


class BarrierTimeoutError(DiscoveryError, TimeoutError):
    """The leader and workers did not all register in time; ``missing`` names who is absent."""

    def __init__(self, timeout: float, missing: list[str], present: list[str]) -> None:
        self.missing = missing
        self.present = present
        super().__init__(
            f"leader/worker barrier timed out after {timeout:g}s: missing {', '.join(missing)}"
            f" (present: {', '.join(present) or 'nobody'}); check that every rank started and "
            "uses the same KVBM_NAMESPACE and discovery backend, or raise "
            "KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS"
        )


class DuplicateInstanceError(DiscoveryError):
    """Another live process holds the same instance id (same role and rank) in the namespace."""


class MessageError(ValueError):
    """A message or registry value is not a valid kvbm message (it is ignored by receivers)."""
