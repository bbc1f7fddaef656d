"""The control channel over NATS (see :mod:`kvbm_discovery.control` for the contract).

Subjects: ``kvbm.<ns>.control.leader``, ``kvbm.<ns>.control.worker.<rank>`` and
``kvbm.<ns>.control.workers`` (broadcast); JSON payloads (:mod:`kvbm_discovery.messages`).

Delivery:
- ``send_to_leader`` / ``send_to_worker`` are acknowledged: each message travels in a signed
  envelope (:mod:`kvbm_discovery.envelope`: the sender's id, a sequence number and the
  subject, HMAC-SHA256 with ``KVBM_CONTROL_SECRET``) and is sent as a request; the receiver
  replies ``ok`` once the message is in its inbox, or ``retry`` when its inbox is full or the
  sender's registration has not reached it yet. The sender retries (through disconnects,
  server restarts and a receiver that is not subscribed yet) until acknowledged or until
  ``delivery_timeout_secs`` pass (then it is counted in ``num_undelivered`` and logged). One
  message at a time per channel, so order is kept; the receiver drops repeats by sequence
  number, so a retry after a lost acknowledgement is not delivered twice, and neither is a
  replayed message.
- ``broadcast`` is a plain publish (best effort): it reaches the workers subscribed at that
  moment. Send what must arrive with ``send_to_worker`` per rank.
- Receiving: :class:`~kvbm_discovery.admission.Admission` decides, on the connection's loop
  thread; what it refuses gets no reply, is counted (``num_rejected``, and on the inbox) and
  is logged rate-limited.
Opening an inbox returns only once the server has the subscription.

The constructor needs the deployment secret (see :mod:`kvbm_discovery.control_secret`):
without ``KVBM_CONTROL_SECRET`` / ``_FILE`` it raises ``ConfigError`` unless
``KVBM_CONTROL_INSECURE=1``. ``roster`` (the discovery view) turns on the sender checks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from kvbm_core.config import KvbmConfig
from kvbm_discovery import messages
from kvbm_discovery.admission import ADMIT, REPEAT, RETRY, Admission, Roster, Verdict
from kvbm_discovery.bounded_log import RateLimitedLog
from kvbm_discovery.control import ControlChannel, Inbox
from kvbm_discovery.control_secret import control_secret
from kvbm_discovery.envelope import new_sender_id, seal
from kvbm_discovery.naming import broadcast_subject, check_token, leader_subject, worker_subject
from kvbm_discovery.nats_conn import NatsConnection

__all__ = ["NatsControlChannel"]

log = logging.getLogger(__name__)

_ACK = b"ok"
_RETRY = b"retry"
_PENDING_BYTES = 64 * 1024 * 1024


class NatsControlChannel(ControlChannel):
    def __init__(
        self,
        config: KvbmConfig,
        connect_timeout_secs: float = 3.0,
        delivery_timeout_secs: float = 60.0,
        ack_timeout_secs: float = 1.0,
        sender_id: str | None = None,
        roster: Roster | None = None,
    ) -> None:
        self.namespace = check_token(config.namespace)
        self.delivery_timeout_secs = delivery_timeout_secs
        self.ack_timeout_secs = ack_timeout_secs
        self.secret = control_secret(config, "the NATS control channel")
        self.sender_id = sender_id or new_sender_id()
        self.admission = Admission(self.secret, roster)
        self._full_log = RateLimitedLog(log)
        self.num_duplicates = 0
        self.num_retries = 0
        self.num_undelivered = 0
        self._seq = 0
        self._broadcast_seq = 0
        self._done_seq = 0
        self._seq_lock = threading.Lock()
        self._conn = NatsConnection(config, "control", connect_timeout_secs)
        self._outbox: asyncio.Queue[tuple[str, bytes, int]] = self._conn.call(self._start)

    async def _start(self) -> asyncio.Queue[tuple[str, bytes, int]]:
        outbox: asyncio.Queue[tuple[str, bytes, int]] = asyncio.Queue()
        asyncio.get_running_loop().create_task(self._deliver_forever(outbox))
        return outbox

    @property
    def connection(self) -> NatsConnection:
        return self._conn

    @property
    def max_payload_bytes(self) -> int:
        """The server's ``max_payload`` (from its INFO; 1 MiB by default), within the decoder's bound."""
        return min(int(self._conn.nc.max_payload), messages.MAX_MESSAGE_BYTES)

    @property
    def num_rejected(self) -> int:
        """Messages refused: malformed, oversized, unsigned, badly signed or from the wrong sender."""
        return self.admission.num_rejected

    num_malformed = num_rejected  # type: ignore[assignment]  # the name of the interface

    # -- sending ----------------------------------------------------------------------------

    def send_to_leader(self, message: messages.Message) -> None:
        self._send_acked(leader_subject(self.namespace), message)

    def send_to_worker(self, rank: int, message: messages.Message) -> None:
        self._send_acked(worker_subject(self.namespace, rank), message)

    def broadcast(self, message: messages.Message) -> None:
        subject = broadcast_subject(self.namespace)
        payload = messages.encode(message)
        with self._seq_lock:  # a stream of its own: publishes overtake acknowledged sends
            self._broadcast_seq += 1
            self._conn.publish_soon(subject, seal(self.secret, self.sender_id, self._broadcast_seq, subject, payload))

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
        sealed = seal(self.secret, self.sender_id, seq, subject, payload)
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
                reply = await self._conn.nc.request(subject, sealed, timeout=self.ack_timeout_secs)
            except Exception as exc:  # noqa: BLE001 - no responders, timeout, reconnecting: retry
                log.debug("kvbm control: message %d to %s not acknowledged yet: %r", seq, subject, exc)
                await asyncio.sleep(0.1)
                continue
            if reply.data == _ACK:
                return True
            await asyncio.sleep(0.05)  # "retry": the receiver's inbox is full or it lacks our registration
        return False

    # -- receiving --------------------------------------------------------------------------

    def leader_inbox(self) -> Inbox:
        return self._open([leader_subject(self.namespace)], to_leader=True)

    def worker_inbox(self, rank: int) -> Inbox:
        return self._open([worker_subject(self.namespace, rank), broadcast_subject(self.namespace)], to_leader=False)

    def _receive(self, inbox: Inbox, data: bytes, subject: str, to_leader: bool) -> bytes | None:
        """The reply for one received message (``None``: none), after letting it in or not."""
        verdict = self.admission.check(data, subject, to_leader)
        if verdict.outcome == ADMIT:
            return self._admit(inbox, verdict, len(data))
        if verdict.outcome == REPEAT:
            self.num_duplicates += 1
            return _ACK
        if verdict.outcome == RETRY:
            return _RETRY
        inbox.count_rejected()
        return None

    def _admit(self, inbox: Inbox, verdict: Verdict, size: int) -> bytes:
        assert verdict.message is not None
        if not inbox.put(verdict.message, size):
            self._full_log.warning("full", "kvbm control: inbox full (%d messages); the sender retries", len(inbox))
            return _RETRY
        self.admission.admitted(verdict)
        return _ACK

    def _open(self, subjects: list[str], to_leader: bool) -> Inbox:
        inbox = Inbox()

        async def on_message(msg: Any) -> None:
            try:
                reply = self._receive(inbox, msg.data, msg.subject, to_leader)
            except Exception:  # noqa: BLE001 - nothing a peer sends may end the subscription
                log.exception("kvbm control: handling a message on %s failed", msg.subject)
                return
            if msg.reply and reply is not None:
                try:
                    await self._conn.nc.publish(msg.reply, reply)
                except Exception as exc:  # noqa: BLE001 - the sender retries; we drop the repeat
                    log.debug("kvbm control: acknowledgement failed: %r", exc)

        async def subscribe() -> None:
            for subject in subjects:
                await self._conn.nc.subscribe(subject, cb=on_message, pending_bytes_limit=_PENDING_BYTES)
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
