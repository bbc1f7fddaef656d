"""The control channel over NATS (see :mod:`kvbm_discovery.control` for the contract).

Subjects: ``kvbm.<ns>.control.leader``, ``kvbm.<ns>.control.worker.<rank>`` and
``kvbm.<ns>.control.workers`` (broadcast); JSON payloads (:mod:`kvbm_discovery.messages`).

Delivery:
- ``send_to_leader`` / ``send_to_worker`` are acknowledged: each message carries the
  sender's id and a sequence number in NATS headers and is sent as a request; the receiver
  replies once the message is in its inbox. The sender retries (through disconnects, server
  restarts and a receiver that is not subscribed yet) until acknowledged or until
  ``delivery_timeout_secs`` pass (then it is counted in ``num_undelivered`` and logged). One
  message at a time per channel, so order is kept; the receiver drops repeats by sequence
  number, so a retry after a lost acknowledgement is not delivered twice.
- ``broadcast`` is a plain publish (best effort): it reaches the workers subscribed at that
  moment. Send what must arrive with ``send_to_worker`` per rank.
Opening an inbox returns only once the server has the subscription.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from kvbm_core.config import KvbmConfig
from kvbm_discovery import messages
from kvbm_discovery.control import ControlChannel, Inbox
from kvbm_discovery.errors import MessageError
from kvbm_discovery.naming import broadcast_subject, check_token, leader_subject, worker_subject
from kvbm_discovery.nats_conn import NatsConnection

__all__ = ["NatsControlChannel"]

log = logging.getLogger(__name__)

SENDER_HEADER = "Kvbm-Sender"
SEQ_HEADER = "Kvbm-Seq"
_ACK = b"ok"


class NatsControlChannel(ControlChannel):
    def __init__(
        self,
        config: KvbmConfig,
        connect_timeout_secs: float = 3.0,
        delivery_timeout_secs: float = 60.0,
        ack_timeout_secs: float = 1.0,
    ) -> None:
        self.namespace = check_token(config.namespace)
        self.delivery_timeout_secs = delivery_timeout_secs
        self.ack_timeout_secs = ack_timeout_secs
        self.sender_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.num_malformed = 0
        self.num_duplicates = 0
        self.num_retries = 0
        self.num_undelivered = 0
        self._seq = 0
        self._done_seq = 0
        self._seq_lock = threading.Lock()
        self._last_seq: dict[str, int] = {}
        self._conn = NatsConnection(config, "control", connect_timeout_secs)
        self._outbox: asyncio.Queue[tuple[str, bytes, int]] = self._conn.call(self._start)

    async def _start(self) -> asyncio.Queue[tuple[str, bytes, int]]:
        outbox: asyncio.Queue[tuple[str, bytes, int]] = asyncio.Queue()
        asyncio.get_running_loop().create_task(self._deliver_forever(outbox))
        return outbox

    @property
    def connection(self) -> NatsConnection:
        return self._conn

    # -- sending ----------------------------------------------------------------------------

    def send_to_leader(self, message: messages.Message) -> None:
        self._send_acked(leader_subject(self.namespace), message)

    def send_to_worker(self, rank: int, message: messages.Message) -> None:
        self._send_acked(worker_subject(self.namespace, rank), message)

    def broadcast(self, message: messages.Message) -> None:
        self._conn.publish_soon(broadcast_subject(self.namespace), messages.encode(message))

    def _send_acked(self, subject: str, message: messages.Message) -> None:
        payload = messages.encode(message)  # encode in the caller: a bad message raises here
        with self._seq_lock:  # engine threads of several ranks may share one channel
            self._seq += 1
            self._conn.call_soon(self._outbox.put_nowait, (subject, payload, self._seq))

    async def _deliver_forever(self, outbox: asyncio.Queue[tuple[str, bytes, int]]) -> None:
        while True:
            subject, payload, seq = await outbox.get()
            is_delivered = await self._deliver(subject, payload, seq)
            self._done_seq = seq
            if not is_delivered:
                self.num_undelivered += 1
                log.error(
                    "kvbm control: gave up on message %d to %s after %gs without an acknowledgement "
                    "(is the receiver running and subscribed?)", seq, subject, self.delivery_timeout_secs
                )

    async def _deliver(self, subject: str, payload: bytes, seq: int) -> bool:
        headers = {SENDER_HEADER: self.sender_id, SEQ_HEADER: str(seq)}
        deadline = time.monotonic() + self.delivery_timeout_secs
        is_retry = False
        while time.monotonic() < deadline:
            if not self._conn.is_connected:
                await asyncio.sleep(0.05)
                continue
            if is_retry:
                self.num_retries += 1
            is_retry = True
            try:
                reply = await self._conn.nc.request(subject, payload, timeout=self.ack_timeout_secs, headers=headers)
            except Exception as exc:  # noqa: BLE001 - no responders, timeout, reconnecting: retry
                log.debug("kvbm control: message %d to %s not acknowledged yet: %r", seq, subject, exc)
                await asyncio.sleep(0.1)
                continue
            if reply.data == _ACK:
                return True
        return False

    # -- receiving --------------------------------------------------------------------------

    def leader_inbox(self) -> Inbox:
        return self._open([leader_subject(self.namespace)])

    def worker_inbox(self, rank: int) -> Inbox:
        return self._open([worker_subject(self.namespace, rank), broadcast_subject(self.namespace)])

    def _is_repeat(self, headers: dict[str, str] | None) -> bool:
        if not headers or SENDER_HEADER not in headers:
            return False
        try:
            seq = int(headers.get(SEQ_HEADER, ""))
        except ValueError:
            return False
        sender = headers[SENDER_HEADER]
        if seq <= self._last_seq.get(sender, 0):
            return True
        self._last_seq[sender] = seq
        return False

    def _open(self, subjects: list[str]) -> Inbox:
        inbox = Inbox()

        async def on_message(msg: Any) -> None:
            try:
                message = messages.decode(msg.data)
            except MessageError as exc:
                self.num_malformed += 1
                log.warning("kvbm control: ignoring a malformed message on %s: %s", msg.subject, exc)
                return
            if self._is_repeat(msg.headers):
                self.num_duplicates += 1
            else:
                inbox.put(message)
            if msg.reply:
                try:
                    await self._conn.nc.publish(msg.reply, _ACK)
                except Exception as exc:  # noqa: BLE001 - the sender retries; we drop the repeat
                    log.debug("kvbm control: acknowledgement failed: %r", exc)

        async def subscribe() -> None:
            for subject in subjects:
                await self._conn.nc.subscribe(subject, cb=on_message)
            await self._conn.nc.flush(timeout=5)

        self._conn.call(subscribe, timeout=10)
        return inbox

    def close(self, timeout: float = 3.0) -> None:
        """Wait (bounded) for queued messages to be acknowledged, then close."""

        async def drained() -> None:
            while not self._outbox.empty() or self._in_flight():
                await asyncio.sleep(0.01)

        try:
            self._conn.call(drained, timeout)
        except Exception:  # noqa: BLE001 - closing anyway
            log.warning("kvbm control: closing with %d message(s) unacknowledged", self._outbox.qsize())
        self._conn.close()

    def _in_flight(self) -> bool:
        return self._done_seq < self._seq
