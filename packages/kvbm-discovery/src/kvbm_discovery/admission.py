"""Which received control messages are let in (the receiving side of the NATS channel).

Runs in every process that opens an inbox (the leader, each worker rank), on the NATS
connection's loop thread, never on the engine's. ``Admission.check(data, subject, to_leader)``
returns a :class:`Verdict`, checked in this order:

1. the envelope (:mod:`kvbm_discovery.envelope`): within ``MAX_MESSAGE_BYTES``, signed with
   the deployment secret (when this process holds one), meant for ``subject``;
2. the payload decodes as a bounded kvbm message of a kind this side receives
   (``TO_LEADER`` on the leader's subject, ``TO_WORKERS`` on the workers');
3. the sender: a message claiming rank r must come from the process registered as
   ``worker-r`` (a message to workers, from the one registered as ``leader``), according to
   the ``roster`` (the discovery view). Not registered yet -> ``retry`` (the sender's
   acknowledged delivery tries again, since registrations and messages race);
4. the sequence: at most once per ``(sender, scope, seq)`` -> else ``repeat``.

``reject`` verdicts are counted (``num_rejected``) and logged rate-limited; ``admitted(verdict)``
records the sequence once the message is in its inbox.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from kvbm_core.messages import TO_LEADER, TO_WORKERS, Message
from kvbm_discovery.bounded_log import RateLimitedLog
from kvbm_discovery.discovery import InstanceInfo, leader_id, worker_id
from kvbm_discovery.envelope import Envelope, unseal
from kvbm_discovery.errors import MessageError
from kvbm_discovery.messages import MAX_MESSAGE_BYTES, decode

__all__ = ["ADMIT", "REJECT", "REPEAT", "RETRY", "Admission", "Roster", "Verdict"]

log = logging.getLogger(__name__)

ADMIT, REJECT, REPEAT, RETRY = "admit", "reject", "repeat", "retry"
# Senders whose last sequence is remembered; unsigned (insecure) senders cost memory too.
_MAX_SENDERS = 4096


class Roster(Protocol):
    def get(self, instance_id: str) -> InstanceInfo | None: ...


@dataclass(frozen=True)
class Verdict:
    outcome: str
    reason: str = ""
    message: Message | None = None
    envelope: Envelope | None = None


class Admission:
    def __init__(self, secret: bytes | None, roster: Roster | None = None) -> None:
        self.secret = secret
        self.roster = roster
        self.num_rejected = 0
        self.num_retries = 0
        self._last_seq: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._log = RateLimitedLog(log)

    def check(self, data: bytes, subject: str, to_leader: bool) -> Verdict:
        try:
            envelope = unseal(self.secret, data, MAX_MESSAGE_BYTES + 1024)
            if envelope.scope != subject:
                raise MessageError(f"signed for {envelope.scope!r}, not for this subject")
            message = decode(envelope.payload)
        except MessageError as exc:
            return self._reject(subject, str(exc))
        if not isinstance(message, TO_LEADER if to_leader else TO_WORKERS):
            return self._reject(subject, f"a {type(message).__name__} is not sent to this side")
        verdict = self._check_sender(envelope, message)
        if verdict.outcome != ADMIT:
            return verdict
        if envelope.seq <= self._last_seq.get((envelope.sender, envelope.scope), 0):
            return Verdict(REPEAT, f"sequence {envelope.seq} from {envelope.sender} seen already")
        return verdict

    def _check_sender(self, envelope: Envelope, message: Message) -> Verdict:
        if self.roster is None:
            return Verdict(ADMIT, message=message, envelope=envelope)
        claimed = worker_id(message.rank) if isinstance(message, TO_LEADER) else leader_id()
        registered = self.roster.get(claimed)
        if registered is None:
            self.num_retries += 1
            return Verdict(RETRY, f"{claimed} is not registered (yet)")
        if registered.sender != envelope.sender:
            return self._reject(
                envelope.scope, f"claims to be {claimed}, which another process registered"
            )
        return Verdict(ADMIT, message=message, envelope=envelope)

    def _reject(self, subject: str, reason: str) -> Verdict:
        self.num_rejected += 1
        self._log.warning(
            subject, "kvbm control: dropping a message on %s: %s (%d dropped so far)",
            subject, reason, self.num_rejected,
        )
        return Verdict(REJECT, reason)

    def admitted(self, verdict: Verdict) -> None:
        """Remember the sequence of a message now in its inbox."""
        assert verdict.envelope is not None
        key = (verdict.envelope.sender, verdict.envelope.scope)
        self._last_seq[key] = verdict.envelope.seq
        self._last_seq.move_to_end(key)
        while len(self._last_seq) > _MAX_SENDERS:
            self._last_seq.popitem(last=False)
