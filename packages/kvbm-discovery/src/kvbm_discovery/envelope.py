"""The signed envelope around every control message and etcd registration (any process).

Wire form: one header line, then the payload bytes exactly as sent::

    KVBM1 <sender> <seq> <scope> <mac>\\n<payload>

- ``sender``: the sending process's incarnation id (``new_sender_id()``: host, pid and a
  random part), registered in discovery with its instances, so a receiver can check that a
  message claiming rank r comes from whoever registered rank r; a restarted process has a
  new one.
- ``seq``: per sender and scope, increasing; a receiver refuses a ``seq`` it has passed
  (replays, and repeats after a lost acknowledgement).
- ``scope``: where the bytes are meant to be: the NATS subject, or ``<instance>@<lease>`` for
  an etcd value, so a signed message cannot be moved to another subject, key or lease.
- ``mac``: HMAC-SHA256 (hex) with the deployment secret over the header line (without the
  mac) and the payload; ``-`` when sent unsigned (``KVBM_CONTROL_INSECURE``).

``seal(secret, sender, seq, scope, payload) -> bytes``; ``unseal(secret, data, max_bytes) ->
Envelope`` raises :class:`MessageError` for anything malformed, oversized or, when the
receiver holds a secret, not signed with it. Verification uses a constant-time compare and
runs before the payload is parsed at all.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import socket
import uuid
from dataclasses import dataclass

from kvbm_discovery.errors import MessageError

__all__ = ["Envelope", "seal", "unseal", "new_sender_id"]

_MAGIC = b"KVBM1"
_UNSIGNED = b"-"
_MAX_HEADER = 512
_HEADER = re.compile(
    rb"^KVBM1 ([A-Za-z0-9._-]{1,128}) ([0-9]{1,20}) ([A-Za-z0-9._@:*>-]{1,256}) ([0-9a-f]{64}|-)$"
)


@dataclass(frozen=True)
class Envelope:
    sender: str
    seq: int
    scope: str
    payload: bytes
    is_signed: bool


def new_sender_id() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def _mac(secret: bytes, header: bytes, payload: bytes) -> bytes:
    digest = hmac.new(secret, header, hashlib.sha256)
    digest.update(b"\n")
    digest.update(payload)
    return digest.hexdigest().encode()


def seal(secret: bytes | None, sender: str, seq: int, scope: str, payload: bytes) -> bytes:
    header = b" ".join((_MAGIC, sender.encode(), str(int(seq)).encode(), scope.encode()))
    mac = _UNSIGNED if secret is None else _mac(secret, header, payload)
    return header + b" " + mac + b"\n" + payload


def unseal(secret: bytes | None, data: bytes, max_bytes: int) -> Envelope:
    if len(data) > max_bytes:
        raise MessageError(f"message is {len(data)} bytes, over the limit of {max_bytes}")
    line, newline, payload = bytes(data[: _MAX_HEADER + 1]).partition(b"\n")
    match = _HEADER.match(line) if newline else None
    if match is None:
        raise MessageError("not a kvbm envelope (no valid 'KVBM1 sender seq scope mac' line)")
    payload = bytes(data[len(line) + 1 :])
    sender, seq, scope, mac = match.groups()
    if secret is not None:
        header = line[: -len(mac) - 1]
        if mac == _UNSIGNED:
            raise MessageError("unsigned, and this process requires KVBM_CONTROL_SECRET signatures")
        if not hmac.compare_digest(mac, _mac(secret, header, payload)):
            raise MessageError("bad signature (not signed with this deployment's KVBM_CONTROL_SECRET)")
    return Envelope(sender.decode(), int(seq), scope.decode(), payload, mac != _UNSIGNED)
