"""KV events over NATS: the sink (leader side) and a listener (routers, tools, tests).

``NatsEventSink.publish`` only appends to the bounded buffer of
:class:`~kvbm_discovery.event_sink.BufferedEventSink`; a task on the connection's own loop
sends batches of up to ``batch_size`` events every ``flush_interval_secs`` to
``kvbm.<namespace>.events.<worker_id>``. While NATS is unreachable the events stay buffered
(up to ``capacity``; the rest are dropped and counted) and go out after the reconnect.

``NatsEventListener`` subscribes to one worker's subject (or all) and queues decoded
:class:`~kvbm_discovery.event_sink.EventBatch` es; malformed or foreign payloads are ignored
with a warning and counted in ``num_malformed``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from typing import Any

from kvbm_core.config import KvbmConfig
from kvbm_discovery.errors import MessageError
from kvbm_discovery.event_sink import (
    DEFAULT_CAPACITY,
    BufferedEventSink,
    EventBatch,
    decode_batch,
    encode_batch,
)
from kvbm_discovery.naming import check_token, events_subject, events_wildcard
from kvbm_discovery.nats_conn import NatsConnection

__all__ = ["NatsEventSink", "NatsEventListener"]

log = logging.getLogger(__name__)


class NatsEventSink(BufferedEventSink):
    def __init__(
        self,
        config: KvbmConfig,
        worker_id: str,
        capacity: int = DEFAULT_CAPACITY,
        batch_size: int = 512,
        flush_interval_secs: float = 0.02,
        connect_timeout_secs: float = 3.0,
    ) -> None:
        super().__init__(capacity)
        self.namespace = check_token(config.namespace)
        self.worker_id = worker_id
        self.subject = events_subject(self.namespace, worker_id)
        self.batch_size = batch_size
        self.flush_interval_secs = flush_interval_secs
        self._seq = 0
        self._conn = NatsConnection(config, f"events-{worker_id}", connect_timeout_secs)
        self._conn.submit(self._pump)

    @property
    def is_connected(self) -> bool:
        return self._conn.is_connected

    @property
    def connection(self) -> NatsConnection:
        return self._conn

    async def _pump(self) -> None:
        while True:
            if not self._conn.is_connected or not await self._send_batch():
                await asyncio.sleep(self.flush_interval_secs)

    async def _send_batch(self) -> bool:
        """Send one batch; ``False`` when there was nothing to send."""
        batch = self.take(self.batch_size)
        if not batch:
            return False
        seq, self._seq = self._seq, self._seq + 1  # before the await: close() may send too
        payload = encode_batch(self.namespace, self.worker_id, seq, batch)
        try:
            await self._conn.nc.publish(self.subject, payload)
        except Exception as exc:  # noqa: BLE001 - lost, counted, and the pump goes on
            self._mark_dropped(len(batch))
            log.warning("kvbm events: dropped %d events (publish failed: %r)", len(batch), exc)
            return False
        self._mark_sent(len(batch))
        return True

    async def _flush_all(self) -> None:
        while self._conn.is_connected and await self._send_batch():
            pass
        if self._conn.is_connected:
            await self._conn.nc.flush(timeout=2)

    def close(self, timeout: float = 3.0) -> None:
        """Send what is buffered while connected (bounded by ``timeout``), then stop."""
        if self._conn._loop.is_running:
            try:
                self._conn.call(self._flush_all, timeout)
            except Exception as exc:  # noqa: BLE001 - closing anyway; the rest counts as dropped
                log.warning("kvbm events: could not flush before close: %r", exc)
        self._close_buffer()
        self._conn.close()


class NatsEventListener:
    def __init__(self, config: KvbmConfig, worker_id: str | None = None, connect_timeout_secs: float = 3.0) -> None:
        namespace = check_token(config.namespace)
        self.subject = events_wildcard(namespace) if worker_id is None else events_subject(namespace, worker_id)
        self.num_malformed = 0
        self._batches: queue.SimpleQueue[EventBatch] = queue.SimpleQueue()
        self._conn = NatsConnection(config, "events-listener", connect_timeout_secs)

        async def subscribe() -> None:
            await self._conn.nc.subscribe(self.subject, cb=self._on_message)
            await self._conn.nc.flush(timeout=5)

        self._conn.call(subscribe, timeout=10)

    @property
    def connection(self) -> NatsConnection:
        return self._conn

    async def _on_message(self, msg: Any) -> None:
        try:
            self._batches.put(decode_batch(msg.data))
        except MessageError as exc:
            self.num_malformed += 1
            log.warning("kvbm events: ignoring a malformed message on %s: %s", msg.subject, exc)

    def get(self, timeout: float) -> EventBatch | None:
        try:
            return self._batches.get(timeout=timeout)
        except queue.Empty:
            return None

    def poll(self) -> list[EventBatch]:
        batches = []
        while True:
            try:
                batches.append(self._batches.get_nowait())
            except queue.Empty:
                return batches

    def close(self) -> None:
        self._conn.close()
