"""The worker's side of a chunked restore: send one tier's ``{hash: slot}`` to the leader in
:class:`~kvbm_discovery.restore_chunks.StoredBlocksChunk` parts under the channel's payload
limit, a window of them at a time, each acknowledged by the leader's ``RestoreAck``.

Runs in a worker rank's process at start-up, on the thread that registers the KV caches,
before the engine runs: it reads the rank's own inbox, which nothing else reads yet.

``send_restore(control, inbox, rank, tier, blocks, timeout_secs) -> RestoreReport``
(the leader's side is :mod:`kvbm_discovery.restore_assembly`):
- parts fit ``control.max_payload_bytes`` (NATS: the server's ``max_payload``, 1 MiB by
  default; in-process: the decoder's bound);
- at most ``window`` parts are unacknowledged at once, and the window holds at most
  ``WINDOW_BYTES``, so neither the leader's bounded inbox nor a NATS outbox fills up, however
  many blocks there are;
- a part unacknowledged for ``resend_secs`` is sent again (the leader keeps it once);
- returns after every part is acknowledged or ``timeout_secs`` passed; the report says which.
  Other messages arriving meanwhile are logged and ignored (the engine has run nothing yet,
  so nothing it would need can arrive).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvbm_discovery.control import Inbox
from kvbm_discovery.restore_chunks import (
    RestoreAck,
    StoredBlocksChunk,
    new_restore_id,
    split_blocks,
)

__all__ = ["RestoreReport", "send_restore", "WINDOW_BYTES"]

log = logging.getLogger(__name__)

WINDOW_BYTES = 4 * 1024 * 1024
_RESEND_SECS = 15.0


@dataclass(frozen=True)
class RestoreReport:
    tier: str
    num_blocks: int
    num_chunks: int
    num_acked: int
    num_resent: int
    seconds: float

    @property
    def is_complete(self) -> bool:
        return self.num_acked == self.num_chunks


class _Window:
    """Which parts are out, since when, and which the leader acknowledged."""

    def __init__(self, chunks: list[StoredBlocksChunk], size: int) -> None:
        self.chunks = chunks
        self.size = size
        self.sent_at: dict[int, float] = {}
        self.acked: set[int] = set()
        self.next_index = 0
        self.num_resent = 0

    def to_send(self, now: float, resend_secs: float) -> list[StoredBlocksChunk]:
        due = [i for i, t in self.sent_at.items() if now - t > resend_secs]
        self.num_resent += len(due)
        fresh: list[int] = []
        while self.next_index < len(self.chunks) and len(self.sent_at) + len(fresh) < self.size:
            fresh.append(self.next_index)
            self.next_index += 1
        due.extend(fresh)
        for index in due:
            self.sent_at[index] = now
        return [self.chunks[i] for i in due]

    def ack(self, index: int) -> None:
        if self.sent_at.pop(index, None) is not None:
            self.acked.add(index)


def send_restore(
    control: Any,  # a ControlChannel (the runtime sees it through its own protocol)
    inbox: Inbox,
    rank: int,
    tier: str,
    blocks: Mapping[int, int],
    timeout_secs: float,
    resend_secs: float = _RESEND_SECS,
    max_payload_bytes: int | None = None,
) -> RestoreReport:
    """Send ``blocks`` and wait for the leader's acknowledgements.

    Args:
        control: the rank's control channel.
        inbox: the rank's own inbox (``control.worker_inbox(rank)``), where acknowledgements arrive.
        rank, tier, blocks: whose blocks, of which tier, ``{hash: slot}``.
        timeout_secs: the longest wait for every acknowledgement.
        resend_secs: send a part again when unacknowledged this long.
        max_payload_bytes: a smaller limit than the channel's (tests).

    Returns:
        What was sent and acknowledged; ``is_complete`` when the leader holds every part.
    """
    started = time.monotonic()
    max_payload = min(control.max_payload_bytes, max_payload_bytes or control.max_payload_bytes)
    restore_id = new_restore_id()
    window = _Window(split_blocks(rank, tier, restore_id, blocks, max_payload), max(1, WINDOW_BYTES // max_payload))
    deadline = started + timeout_secs
    while len(window.acked) < len(window.chunks) and (left := deadline - time.monotonic()) > 0:
        for chunk in window.to_send(time.monotonic(), resend_secs):
            control.send_to_leader(chunk)
        message = inbox.get(timeout=min(left, 0.5))
        if _is_ack_for(message, rank, tier, restore_id):
            assert isinstance(message, RestoreAck)
            window.ack(message.chunk_index)
        elif message is not None and not isinstance(message, RestoreAck):
            log.warning("kvbm worker %d: ignoring %s while restoring %s", rank, type(message).__name__, tier)
    return RestoreReport(tier, len(blocks), len(window.chunks), len(window.acked), window.num_resent,
                         time.monotonic() - started)


def _is_ack_for(message: object, rank: int, tier: str, restore_id: str) -> bool:
    return (
        isinstance(message, RestoreAck)
        and message.rank == rank and message.tier == tier and message.restore_id == restore_id
    )
