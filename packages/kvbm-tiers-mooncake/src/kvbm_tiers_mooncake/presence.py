"""What the leader learns about the shared store: batched existence queries (leader process).

``MooncakePresence(settings, keys, timeout_s, negative_ttl_s)`` is the tier's
:class:`kvbm_core.presence.PresenceSource`. ``query(hashes)`` asks the store, in one
``batch_is_exist`` call, for every rank's key of every hash not in its negative cache, and
answers with the hashes whose every shard is present. The call runs on a helper thread and is
waited for at most ``timeout_s``: a slow or unreachable store answers "nothing present" (the
engine computes) and never stalls the scheduler. A hash found absent is not asked about again
for ``negative_ttl_s`` (a prefix is looked up every time its request is scheduled). The client
connects in the background (at most every ``retry_secs``), so a master that starts later, or
restarts, is picked up without a restart of the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from kvbm_tiers_mooncake.client import StoreSettings, StoreUnavailable, connect
from kvbm_tiers_mooncake.keys import KeyScheme

__all__ = ["MooncakePresence", "MAX_NEGATIVE"]

log = logging.getLogger(__name__)

MAX_NEGATIVE = 100_000  # remembered absent hashes; the oldest are forgotten first
MAX_QUERY_BLOCKS = 4096


class MooncakePresence:
    def __init__(
        self,
        settings: StoreSettings,
        keys: KeyScheme,
        timeout_s: float = 0.05,
        negative_ttl_s: float = 0.5,
        retry_secs: float = 5.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.timeout_s = timeout_s
        self.negative_ttl_s = negative_ttl_s
        self.retry_secs = retry_secs
        self.num_timeouts = 0
        self._clock = clock
        self._negative: OrderedDict[int, float] = OrderedDict()
        self._store: Any = None
        self._connecting: Future[Any] | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-mooncake-presence")
        self._busy: Future[list[int]] | None = None
        self._has_warned = False

    def query(self, block_hashes: Sequence[int]) -> set[int]:
        store = self._client()
        if store is None:
            return set()
        now = self._clock()
        asked = [h for h in block_hashes[:MAX_QUERY_BLOCKS] if self._negative.get(h, 0.0) <= now]
        if not asked:
            return set()
        if self._busy is not None and not self._busy.done():
            return set()  # the last query is still out: do not queue behind it
        self._busy = self._pool.submit(store.batch_is_exist, self.keys.all_shards(asked))
        try:
            codes = self._busy.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.num_timeouts += 1
            return set()
        world = self.keys.world_size
        present = set()
        for i, block_hash in enumerate(asked):
            if all(code == 1 for code in codes[i * world : (i + 1) * world]):
                present.add(block_hash)
            else:
                self._remember_absent(block_hash, now)
        return present

    def forget_absent(self) -> None:
        """Drop the negative cache (tests; an operator after refilling the store)."""
        self._negative.clear()

    def _remember_absent(self, block_hash: int, now: float) -> None:
        self._negative[block_hash] = now + self.negative_ttl_s
        self._negative.move_to_end(block_hash)
        while len(self._negative) > MAX_NEGATIVE:
            self._negative.popitem(last=False)

    def _client(self) -> Any:
        with self._lock:
            if self._store is not None:
                return self._store
            if self._connecting is not None and self._connecting.done():
                future, self._connecting = self._connecting, None
                try:
                    self._store = future.result()
                    return self._store
                except StoreUnavailable as exc:
                    if not self._has_warned:
                        log.warning("kvbm mooncake tier: the leader sees no store yet: %s", exc)
                    self._has_warned = True
                    self._next_try = self._clock() + self.retry_secs
            if self._connecting is None and self._clock() >= self._next_try:
                self._connecting = self._pool.submit(connect, self.settings, 0)
            return None

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until the client is set up (tests, benchmarks); whether it is."""
        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            if self._client() is not None:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()
