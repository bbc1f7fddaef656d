"""The deployment secret that signs the control plane (every kvbm process at start).

``control_secret(config, what)`` returns the key for HMAC-SHA256, or ``None`` when none is
needed or the operator explicitly turned signing off:
- from ``KVBM_CONTROL_SECRET`` (the text itself) or ``KVBM_CONTROL_SECRET_FILE`` (a file
  holding it; it must belong to this user and be unreadable by group and others, like an SSH
  key, or it is refused with the ``chmod``/``chown`` that fixes it);
- ``what`` names the part that needs it ("etcd discovery", "the NATS control channel"); with
  neither setting that is a :class:`ConfigError` naming both, unless
  ``KVBM_CONTROL_INSECURE=1``: then ``None`` and one loud warning per process.

Every process of a deployment must hold the same secret; a secret shorter than
``MIN_SECRET_BYTES`` is refused (a guessable key signs nothing).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

from kvbm_core.config import ConfigError, KvbmConfig

__all__ = ["MIN_SECRET_BYTES", "control_secret"]

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 16
_MAX_FILE_BYTES = 4096
_warned = threading.Event()


def control_secret(config: KvbmConfig, what: str) -> bytes | None:
    if config.control_secret and config.control_secret_file:
        raise ConfigError(
            "KVBM_CONTROL_SECRET and KVBM_CONTROL_SECRET_FILE are both set: set one of them"
        )
    if config.control_secret:
        return _checked(config.control_secret.encode(), "KVBM_CONTROL_SECRET")
    if config.control_secret_file:
        return _checked(_read_private(Path(config.control_secret_file)), "KVBM_CONTROL_SECRET_FILE")
    if config.control_insecure:
        _warn_insecure(what)
        return None
    raise ConfigError(
        f"{what} needs the deployment secret that signs control messages and registrations: "
        "set KVBM_CONTROL_SECRET (e.g. the output of `openssl rand -hex 32`, the same in every "
        "process) or KVBM_CONTROL_SECRET_FILE (a file only this user can read); "
        "KVBM_CONTROL_INSECURE=1 runs unsigned, for trusted test setups only"
    )


def _checked(secret: bytes, var: str) -> bytes:
    secret = secret.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{var} holds {len(secret)} bytes: expected at least {MIN_SECRET_BYTES} "
            "(e.g. `openssl rand -hex 32`)"
        )
    return secret


def _read_private(path: Path) -> bytes:
    var = "KVBM_CONTROL_SECRET_FILE"
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{var}={str(path)!r} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{var}={str(path)!r} is not a regular file")
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"{var}={str(path)!r} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.getuid()}): `chown {os.getuid()} {path}` or use a file of your own"
        )
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{var}={str(path)!r} is readable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}): `chmod 600 {path}`"
        )
    if info.st_size > _MAX_FILE_BYTES:
        raise ConfigError(f"{var}={str(path)!r} is {info.st_size} bytes: a secret, not a file of data")
    return path.read_bytes()


def _warn_insecure(what: str) -> None:
    if _warned.is_set():
        return
    _warned.set()
    log.warning(
        "kvbm: KVBM_CONTROL_INSECURE=1: %s and every other part of the control plane runs "
        "UNSIGNED; anyone who can reach etcd or NATS can forge completions, restores and "
        "registrations. Use it only on a trusted, private network or in tests.", what
    )
