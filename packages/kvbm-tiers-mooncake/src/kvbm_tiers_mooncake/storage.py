"""One rank's view of the shared store (worker process).

``MooncakeStorage`` owns the rank's store client and its key scheme. It holds no slots of its
own: the store sizes and evicts its values, and a value is found by its content key (see
:mod:`kvbm_tiers_mooncake.keys`), never by a slot number. ``num_slots`` is the leader's
presence-cache size; the handlers only check that a job's slots lie inside it.

- ``client()``: the set-up client, or ``None`` while the store is unreachable. A store that is
  down at start, or stopped later, is tried again at most every ``retry_secs`` (one warning,
  then quiet), so jobs fail fast meanwhile and the tier comes back with the store.
- ``register(buffer)``: registers a handler's staging buffer with the current client (again
  after a reconnect); returns the client or ``None``.
- ``verifies_block_hashes``: every value's header names its block, key and layout and carries a
  checksum, checked on every read (:mod:`kvbm_tiers_mooncake.value_format`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kvbm_core.layout import KvLayout
from kvbm_core.transfer import Storage
from kvbm_tiers_mooncake.client import StoreSettings, StoreUnavailable, connect
from kvbm_tiers_mooncake.keys import KeyScheme

__all__ = ["MooncakeStorage"]

log = logging.getLogger(__name__)


class MooncakeStorage(Storage):
    medium = "mooncake"
    verifies_block_hashes = True

    def __init__(
        self,
        layout: KvLayout,
        num_slots: int,
        settings: StoreSettings,
        keys: KeyScheme,
        rank: int,
        layout_fp: int,
        segment_bytes: int = 0,
        retry_secs: float = 5.0,
    ) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.settings = settings
        self.keys = keys
        self.rank = rank
        self.layout_fp = layout_fp
        self.segment_bytes = segment_bytes
        self.retry_secs = retry_secs
        self.generation = 0  # bumped on every new client: buffers must be registered again
        self._store: Any = None
        self._next_try = 0.0
        self._has_warned = False
        self._is_closed = False
        self._lock = threading.Lock()
        self._registered: dict[int, tuple[int, int]] = {}  # buffer address -> (generation, size)
        self.client()

    def client(self) -> Any:
        with self._lock:
            if self._store is None and not self._is_closed and time.monotonic() >= self._next_try:
                self._connect()
            return self._store

    def _connect(self) -> None:
        try:
            self._store = connect(self.settings, self.segment_bytes)
        except StoreUnavailable as exc:
            self._next_try = time.monotonic() + self.retry_secs
            if not self._has_warned:
                log.warning(
                    "kvbm mooncake tier (rank %d) is off until the store is back: %s",
                    self.rank,
                    exc,
                )
            self._has_warned = True
            return
        self.generation += 1
        if self._has_warned:
            log.warning("kvbm mooncake tier (rank %d): store reachable again", self.rank)
        self._has_warned = False

    def register(self, address: int, size: int) -> Any:
        store = self.client()
        if store is None:
            return None
        with self._lock:
            if self._registered.get(address) != (self.generation, size):
                rc = store.register_buffer(address, size)
                if rc != 0:
                    raise StoreUnavailable(
                        f"registering a {size}-byte staging buffer failed ({rc})"
                    )
                self._registered[address] = (self.generation, size)
        return store

    def unregister(self, address: int) -> None:
        with self._lock:
            if self._registered.pop(address, None) is not None and self._store is not None:
                self._store.unregister_buffer(address)

    def close(self) -> None:
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            store, self._store = self._store, None
        if store is not None:
            store.close()
